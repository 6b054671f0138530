//! Tests against real `cellplane serve` processes on loopback, each with its own data directory.
//! Processes are SIGKILLed and restarted; every test checks an invariant, never a log line.

mod audit;
mod bad_input;
mod control_client;
mod crash;
mod linearizable;
mod membership;
mod messenger;
mod route_cache;
mod serving;
mod snapshot;
mod watch;
