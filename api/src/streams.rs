//! Long-lived streams a server holds (route watches, device subscriptions), counted in all and
//! per connection so no one client, and no crowd of them, can hold more than its share. A
//! stream takes a [`Slot`] when it starts and gives it back when it ends, however it ends: the
//! slot lives in the response stream ([`Held`]), which tonic drops as soon as the client
//! goes away.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio_stream::Stream;

use crate::tls::ConnInfo;

/// The connection `request` came on, when the server knows it.
pub fn connection<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
    request.extensions().get::<ConnInfo>().map(|info| info.addr)
}

/// Counts the streams of one kind a server holds.
#[derive(Debug)]
pub struct StreamSlots {
    /// What the streams are, for refusals: `watches`, `subscriptions`.
    what: &'static str,
    /// The limits' names in the config, for refusals.
    names: (&'static str, &'static str),
    max: usize,
    max_per_connection: usize,
    held: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_connection: HashMap<SocketAddr, usize>,
}

impl StreamSlots {
    /// At most `max` streams in all, `max_per_connection` on one connection; `names` are the
    /// two limits as the config names them.
    pub fn new(
        what: &'static str,
        names: (&'static str, &'static str),
        max: usize,
        max_per_connection: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            what,
            names,
            max,
            max_per_connection,
            held: Mutex::default(),
        })
    }

    /// A slot for a stream on `connection`, or `RESOURCE_EXHAUSTED` naming the limit it would
    /// pass.
    pub fn take(self: &Arc<Self>, connection: Option<SocketAddr>) -> Result<Slot, tonic::Status> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.total >= self.max {
            return Err(tonic::Status::resource_exhausted(format!(
                "{}: this server holds its maximum of {} {}; retry later or elsewhere",
                self.names.0, self.max, self.what
            )));
        }
        if let Some(addr) = connection {
            let on_connection = held.by_connection.entry(addr).or_default();
            if *on_connection >= self.max_per_connection {
                return Err(tonic::Status::resource_exhausted(format!(
                    "{}: this connection holds its maximum of {} {}; open another connection",
                    self.names.1, self.max_per_connection, self.what
                )));
            }
            *on_connection += 1;
        }
        held.total += 1;
        Ok(Slot {
            slots: self.clone(),
            connection,
        })
    }

    /// Streams held now.
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// One stream's place; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<StreamSlots>,
    connection: Option<SocketAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
        held.total = held.total.saturating_sub(1);
        if let Some(addr) = self.connection
            && let Some(count) = held.by_connection.get_mut(&addr)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.by_connection.remove(&addr);
            }
        }
    }
}

/// A response stream holding its slot for as long as it lives.
pub struct Held<S> {
    inner: S,
    _slot: Slot,
}

impl<S> Held<S> {
    pub fn new(inner: S, slot: Slot) -> Self {
        Self { inner, _slot: slot }
    }
}

impl<S: Stream + Unpin> Stream for Held<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_in_all_and_per_connection_and_given_back() {
        let slots = StreamSlots::new("watches", ("limits.max", "limits.per"), 3, 2);
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().expect("addr"),
            "127.0.0.1:2".parse().expect("addr"),
        );
        let first = slots.take(Some(a)).expect("1 of 2 on a");
        let _second = slots.take(Some(a)).expect("2 of 2 on a");
        let past = slots.take(Some(a)).expect_err("3 on a");
        assert_eq!(past.code(), tonic::Code::ResourceExhausted);
        assert!(past.message().starts_with("limits.per:"), "{past:?}");
        let _third = slots.take(Some(b)).expect("3 of 3 in all");
        let full = slots.take(Some(b)).expect_err("4 in all");
        assert!(full.message().starts_with("limits.max:"), "{full:?}");
        drop(first);
        assert_eq!(slots.held(), 2);
        slots.take(Some(a)).expect("a's place is free again");
    }
}
