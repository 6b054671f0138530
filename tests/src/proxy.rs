//! A TCP proxy the test controls: put between a process and a server, it cuts the link on
//! demand (every open connection dropped, new ones closed at once) and restores it, so a test
//! can partition one process from another while both keep running. It can also freeze the
//! connections open now: they stay open and carry nothing, as to a machine that died without
//! a FIN or an RST, while new connections go through.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy to one target.
pub struct Proxy {
    pub addr: String,
    cut: Arc<AtomicBool>,
    /// Bumped at each cut, so open connections drop.
    cuts: watch::Sender<u64>,
    /// Bumped at each freeze, so open connections stop forwarding.
    freezes: watch::Sender<u64>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let (cuts, _) = watch::channel(0u64);
        let (freezes, _) = watch::channel(0u64);
        let (target, accepting_cut, accepting_cuts, accepting_freezes) = (
            target.to_string(),
            cut.clone(),
            cuts.clone(),
            freezes.clone(),
        );
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if accepting_cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let mut cut_signal = accepting_cuts.subscribe();
                let mut freeze_signal = accepting_freezes.subscribe();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (mut a, mut b) = (inbound, outbound);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = cut_signal.changed() => {}
                        // Both ends stay open, unread and unwritten, until a cut.
                        _ = freeze_signal.changed() => {
                            let _ = cut_signal.changed().await;
                        }
                    }
                });
            }
        });
        Proxy {
            addr,
            cut,
            cuts,
            freezes,
        }
    }

    /// Stops every open connection from carrying anything, without closing it; new
    /// connections go through.
    pub fn freeze(&self) {
        self.freezes.send_modify(|n| *n += 1);
    }

    /// Drops every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}
