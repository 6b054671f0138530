//! The runtime Raft runs on: tokio, as openraft's own, with the two things a deterministic
//! simulation must control and tokio does not. Election timeouts are drawn from a generator
//! a simulation seeds (openraft's own draws from the OS), and the log store writes on a thread
//! of its own — or, on a thread a simulation runs on (`cellplane_api::simulation`), inline
//! (`log_store.rs`), so that when an entry is durable depends on the simulated clock and not
//! on the machine's scheduler.
//! Outside a simulation nothing changes: the generator is seeded from the OS.

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

use openraft::{AsyncRuntime, OptionalSend, TokioInstant};

thread_local! {
    /// The election generator's state on this thread; `None` until first used or seeded.
    static ELECTIONS: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Makes this thread a simulation's: election timeouts drawn from `seed`, the log written
/// inline. Every node of the simulation runs on this one thread.
pub fn simulate_on_this_thread(seed: u64) {
    ELECTIONS.with(|state| state.set(Some(seed)));
    cellplane_api::simulation::enter_on_this_thread();
}

/// openraft's tokio runtime with [`ElectionRng`] as its generator.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Runtime;

/// SplitMix64 over this thread's state: a few lines, and every seed gives a full-period,
/// well-mixed stream, which is all drawing an election timeout needs.
#[derive(Debug, Default)]
pub struct ElectionRng;

impl rand_core::RngCore for ElectionRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        ELECTIONS.with(|state| {
            let current = state.get().unwrap_or_else(rand::random);
            let next = current.wrapping_add(0x9E37_79B9_7F4A_7C15);
            state.set(Some(next));
            let mut z = next;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        })
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        rand_core::impls::fill_bytes_via_next(self, dest);
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

type Tokio = openraft::TokioRuntime;

impl AsyncRuntime for Runtime {
    type JoinError = <Tokio as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <Tokio as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <Tokio as AsyncRuntime>::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = <Tokio as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = <Tokio as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = ElectionRng;
    type OneshotSender<T: OptionalSend> = <Tokio as AsyncRuntime>::OneshotSender<T>;
    type OneshotReceiverError = <Tokio as AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<T: OptionalSend> = <Tokio as AsyncRuntime>::OneshotReceiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        Tokio::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        Tokio::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        Tokio::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        Tokio::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        Tokio::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        Tokio::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        ElectionRng
    }

    fn oneshot<T: OptionalSend>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>) {
        Tokio::oneshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::RngCore;

    #[test]
    fn a_seeded_thread_draws_the_same_timeouts_every_time() {
        let draws = |seed| {
            std::thread::spawn(move || {
                simulate_on_this_thread(seed);
                (0..4).map(|_| ElectionRng.next_u64()).collect::<Vec<_>>()
            })
            .join()
            .expect("thread")
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
    }

    #[test]
    fn an_unseeded_thread_is_no_simulation() {
        assert!(!cellplane_api::simulation::active());
        assert_ne!(ElectionRng.next_u64(), ElectionRng.next_u64());
    }
}
