//! Push-first delivery: the devices online right now, by user. The writer publishes each
//! committed batch's events here; each subscribed device has a bounded queue. A device whose
//! queue is full is dropped from the hub, and its stream catches up from the store instead, so a
//! slow device never slows the writer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::pns::{Notification, Notifier};
use crate::store::records::{SyncKind, SyncRecord};

/// Events one device may have queued before it is made to catch up from the store.
pub const DEVICE_QUEUE: usize = 1_024;

/// One committed event for one user.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub tenant: String,
    pub user: String,
    pub event: SyncRecord,
}

struct Device {
    id: u64,
    queue: mpsc::Sender<SyncRecord>,
}

/// The online devices. Cheap to clone.
#[derive(Clone, Default)]
pub struct SyncHub {
    inner: Arc<Mutex<HubInner>>,
    /// Where new messages for members with no device online go, when a sink is configured.
    notifier: Option<Notifier>,
}

#[derive(Default)]
struct HubInner {
    next_id: u64,
    devices: HashMap<(String, String), Vec<Device>>,
}

/// A device's subscription; dropping it leaves the hub.
pub struct Subscription {
    hub: SyncHub,
    key: (String, String),
    id: u64,
    pub events: mpsc::Receiver<SyncRecord>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut inner = self.hub.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(devices) = inner.devices.get_mut(&self.key) {
            devices.retain(|d| d.id != self.id);
            if devices.is_empty() {
                inner.devices.remove(&self.key);
            }
        }
    }
}

impl SyncHub {
    /// A hub that hands new messages for offline members to `notifier`.
    pub fn with_notifier(notifier: Option<Notifier>) -> Self {
        Self {
            inner: Arc::default(),
            notifier,
        }
    }

    /// Registers a device of `user`; events committed from now on reach its queue.
    pub fn subscribe(&self, tenant: &str, user: &str) -> Subscription {
        let (queue, events) = mpsc::channel(DEVICE_QUEUE);
        let key = (tenant.to_string(), user.to_string());
        let id = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.next_id += 1;
            let id = inner.next_id;
            inner
                .devices
                .entry(key.clone())
                .or_default()
                .push(Device { id, queue });
            id
        };
        Subscription {
            hub: self.clone(),
            key,
            id,
            events,
        }
    }

    /// Hands committed events to the devices online.
    pub fn publish(&self, deliveries: Vec<Delivery>) {
        if deliveries.is_empty() {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for delivery in deliveries {
            let key = (delivery.tenant, delivery.user);
            let Some(devices) = inner.devices.get_mut(&key) else {
                self.notify_offline(key, delivery.event);
                continue;
            };
            // A full queue drops the device from the hub: its stream sees the queue close and
            // reads the store from its last pts.
            devices.retain(|device| device.queue.try_send(delivery.event.clone()).is_ok());
        }
    }

    /// A new message for a member with no device online, but for the sender's own.
    fn notify_offline(&self, (tenant_id, user_id): (String, String), event: SyncRecord) {
        let Some(notifier) = &self.notifier else {
            return;
        };
        let Some(message) = event.message.filter(|_| event.kind == SyncKind::NewMessage) else {
            return;
        };
        if message.sender_id == user_id {
            return;
        }
        notifier.offer(Notification {
            tenant_id,
            user_id,
            conversation_id: event.conversation_id,
            seq: event.seq,
            message_id: message.message_id.clone(),
            sender_id: message.sender_id.clone(),
        });
    }
}
