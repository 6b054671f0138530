//! Whether the cell is a standby, and of which primary. A standby becomes a primary once, by
//! promotion, and never goes back: the promotion is on disk before the role changes, so a
//! restarted cell started as a standby again finds it and stays a primary.

use std::sync::Arc;

use tokio::sync::watch;

/// The cell's role, shared by the writer, the admin service and the standby's follower;
/// cheap to clone.
#[derive(Debug, Clone)]
pub struct Role {
    standby_of: Arc<watch::Sender<Option<String>>>,
}

impl Role {
    /// A standby of `standby_of`, or a primary.
    pub fn new(standby_of: Option<String>) -> Self {
        Self {
            standby_of: Arc::new(watch::Sender::new(standby_of)),
        }
    }

    /// The primary this cell follows; `None` for a primary.
    pub fn standby_of(&self) -> Option<String> {
        self.standby_of.borrow().clone()
    }

    pub fn is_standby(&self) -> bool {
        self.standby_of.borrow().is_some()
    }

    /// The standby is a primary from now on. Called once the promotion is durable.
    pub fn promote(&self) {
        self.standby_of.send_replace(None);
    }

    /// Resolves once the cell is a primary.
    pub async fn promoted(&self) {
        let mut changes = self.standby_of.subscribe();
        let _ = changes.wait_for(Option::is_none).await;
    }
}
