//! Messages as the IM services send them, and what every run checks of them: writers send
//! through the production `Messenger` (route cache and all), some messages twice at once;
//! afterwards every acknowledged message must be in its conversation's history on the owning
//! cell exactly once, at the seq it was acknowledged with (by every answer it got), seqs
//! contiguous from 1, and no key may ever have had two writers.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::client::{Messenger, MessengerOptions, RouteCache, RouteCacheOptions};
use cellplane_api::proto::cell::{
    ConversationKind, CreateConversationRequest, GetHistoryRequest, SendMessageRequest,
};
use cellplane_api::proto::control::{CreateTenantRequest, Tier};
use tokio::time::Instant;
use tonic::Code;

use crate::nemesis::Nemesis;
use crate::world::{self, Progress, nodes};

pub const MEMBERS: [&str; 2] = ["alice", "bob"];
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// One acknowledged message: which cell took it at which route epoch, and when the send began
/// and ended in simulated time since the simulation began (one clock for every client host).
#[derive(Debug, Clone)]
pub struct Ack {
    pub id: String,
    pub seq: u64,
    pub cell: String,
    pub epoch: u64,
    pub invoked: Duration,
    pub returned: Duration,
}

/// Simulated time since the simulation began, the same on every host.
fn now() -> Duration {
    turmoil::sim_elapsed().expect("the workload runs in a simulation")
}

/// What the writers had acknowledged, per (tenant, conversation), in the order acknowledged.
pub type Acked = BTreeMap<(String, String), Vec<Ack>>;

/// Creates `tenants` of `tier` homed in `region`, each through whichever node answers.
pub async fn create_tenants(tenants: &[&str], tier: Tier, region: &str) {
    for tenant in tenants {
        world::until_done(CALL_TIMEOUT, |via| async move {
            world::control(via)
                .create_tenant(CreateTenantRequest {
                    tenant_id: tenant.to_string(),
                    tier: tier as i32,
                    home_region: region.into(),
                })
                .await
        })
        .await;
    }
}

/// A `Messenger` over a route cache of every node, on the simulated network.
pub async fn messenger() -> Result<Arc<Messenger>, String> {
    messenger_with(MessengerOptions::default().deadline).await
}

/// A `Messenger` like [`messenger`] that gives up each write after `deadline`.
pub async fn messenger_with(deadline: Duration) -> Result<Arc<Messenger>, String> {
    let endpoints: Vec<String> = (1..=nodes()).map(world::endpoint).collect();
    let routes = Arc::new(
        RouteCache::start(
            endpoints,
            RouteCacheOptions {
                tls: crate::net::tls(),
                ..RouteCacheOptions::default()
            },
        )
        .await
        .map_err(|e| format!("route cache: {e}"))?,
    );
    Ok(Arc::new(Messenger::new(
        routes,
        MessengerOptions {
            deadline,
            tls: crate::net::tls(),
            ..MessengerOptions::default()
        },
    )))
}

/// Creates groups `g0`.. of each tenant, retrying until each exists.
pub async fn create_groups(messenger: &Messenger, tenants: &[&str], groups: usize) {
    for tenant in tenants {
        for g in 0..groups {
            loop {
                let created = messenger
                    .create_conversation(CreateConversationRequest {
                        tenant_id: tenant.to_string(),
                        conversation_id: format!("g{g}"),
                        kind: ConversationKind::Group as i32,
                        member_ids: MEMBERS.iter().map(|m| m.to_string()).collect(),
                        route_epoch: 0,
                    })
                    .await;
                match created {
                    Ok(_) => break,
                    Err(status) if status.code() == Code::AlreadyExists => break,
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
    }
}

/// One writer per group of each tenant, sending every 20 ms until `until`; every eighth
/// message is sent twice at once. `writer` names them in their messages' ids.
pub fn spawn_writers(
    tasks: &mut tokio::task::JoinSet<()>,
    messenger: &Arc<Messenger>,
    (tenants, groups): (&[&'static str], usize),
    writer: &'static str,
    until: Instant,
    acked: &Arc<Mutex<Acked>>,
) {
    for tenant in tenants {
        for g in 0..groups {
            let (messenger, acked, tenant) = (messenger.clone(), acked.clone(), *tenant);
            tasks.spawn(async move {
                let key = (tenant.to_string(), format!("g{g}"));
                let mut n = 0u64;
                while Instant::now() < until {
                    n += 1;
                    let id = format!("{tenant}-g{g}-{writer}{n}");
                    let acks = if n.is_multiple_of(8) {
                        // The same send twice at once, as a client's retry racing its
                        // original: both answers must name one message, written once.
                        let (first, again) = tokio::join!(
                            send(&messenger, &key, &id, n),
                            send(&messenger, &key, &id, n)
                        );
                        vec![first, again]
                    } else {
                        vec![send(&messenger, &key, &id, n).await]
                    };
                    acked
                        .lock()
                        .expect("acked")
                        .entry(key.clone())
                        .or_default()
                        .extend(acks.into_iter().flatten());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
    }
}

/// The host of the writers whose view of the routes lags ([`add_lagging_writers`]).
pub const LAGGING: &str = "lagging-clients";

/// A second writer for each group, on a host of its own whose view of the routes lags: the
/// nemesis cuts that host off from the nodes on a schedule of its own (it still reaches every
/// cell), so these writers go on sending to the owner they last knew after the writers that
/// follow the routes have moved on, to an owner that was fenced off, say. They write for
/// `run_for` once `progress` says the workload started; answers a flag set when they are done.
pub fn add_lagging_writers(
    sim: &mut turmoil::Sim<'_>,
    (tenants, groups): (&'static [&'static str], usize),
    run_for: Duration,
    acked: &Arc<Mutex<Acked>>,
    progress: &Arc<Mutex<Progress>>,
) -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let (acked, progress, finished) = (acked.clone(), progress.clone(), done.clone());
    sim.client(LAGGING, async move {
        while !progress.lock().expect("progress").started {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let messenger = messenger().await?;
        let until = Instant::now() + run_for;
        let mut tasks = tokio::task::JoinSet::new();
        spawn_writers(
            &mut tasks,
            &messenger,
            (tenants, groups),
            "lag",
            until,
            &acked,
        );
        while tasks.join_next().await.is_some() {}
        finished.store(true, Ordering::SeqCst);
        Ok(())
    });
    done
}

/// Runs `clients` — given the run's progress, the acknowledgements every writer adds to, and
/// the flag the lagging writers set when done — beside the lagging writers of `workload`,
/// under a nemesis over `hosts` that also cuts the lagging writers off from the nodes. What a
/// replay must repeat (`seeds::trace`): the run's report and faults, and every acknowledgement.
pub fn run<F, Fut>(
    seed: u64,
    mut sim: turmoil::Sim<'_>,
    (dir, hosts): (&Path, Vec<String>),
    workload: (&'static [&'static str], usize),
    run_for: Duration,
    clients: F,
) where
    F: FnOnce(Arc<Mutex<Progress>>, Arc<Mutex<Acked>>, Arc<AtomicBool>) -> Fut,
    Fut: std::future::Future<Output = Result<String, String>> + 'static,
{
    let progress: Arc<Mutex<Progress>> = Arc::default();
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let lagging = add_lagging_writers(&mut sim, workload, run_for, &acked, &progress);
    let nodes = (1..=nodes()).map(world::host).collect();
    let nemesis = Nemesis::new(seed, dir, hosts).lagging(seed, LAGGING, nodes);
    let acks = acked.clone();
    let mut events = world::run_clients(seed, sim, nemesis, progress, run_for, move |progress| {
        clients(progress, acks, lagging)
    });
    let acked = acked.lock().expect("acked");
    events.extend(acked.iter().flat_map(|((tenant, conversation), acks)| {
        acks.iter()
            .map(move |ack| format!("{tenant}/{conversation} {ack:?}"))
    }));
    crate::seeds::trace(&events);
}

/// Returns once `done` is set.
pub async fn finished(done: &AtomicBool) {
    while !done.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends one message, noting the route epoch of the attempt that was answered.
async fn send(messenger: &Messenger, key: &(String, String), id: &str, n: u64) -> Option<Ack> {
    let invoked = now();
    let epoch = AtomicU64::new(0);
    let request = SendMessageRequest {
        tenant_id: key.0.clone(),
        conversation_id: key.1.clone(),
        sender_id: MEMBERS[(n % 2) as usize].into(),
        client_msg_id: id.to_string(),
        body: format!("#{n}").into_bytes(),
        ..Default::default()
    };
    let sent = messenger
        .write(&key.0, &key.1, |mut client, route_epoch| {
            epoch.store(route_epoch, Ordering::Relaxed);
            let mut request = request.clone();
            request.route_epoch = route_epoch;
            async move { client.send_message(request).await }
        })
        .await
        .ok()?;
    Some(Ack {
        id: id.to_string(),
        seq: sent.seq,
        cell: sent.message_id.split('/').next().unwrap_or_default().into(),
        epoch: epoch.load(Ordering::Relaxed),
        invoked,
        returned: now(),
    })
}

/// Cells whose acknowledgements a failover from a standby that was not in sync may have left
/// behind: the RPO of an asynchronous standby. What only such a cell held is merged back into
/// the keys' owners once it runs again, each message once but at the owner's next seq, so its
/// acknowledgements are held to "exactly once" and not to their seq.
pub type Behind = std::collections::BTreeSet<String>;

/// No key had two writers, as the acknowledgements show it: once a send was acknowledged,
/// no send begun after it was accepted at an older route epoch (an owner fenced off still
/// writing), nor given a seq at or below its own (two writers numbering one conversation) —
/// unless the first was one a failover left `behind`, whose seqs its successor reused.
pub fn one_writer(acked: &Acked, behind: &Behind) -> Result<(), String> {
    for ((tenant, conversation), acks) in acked {
        let mut by_return: Vec<&Ack> = acks.iter().collect();
        by_return.sort_by_key(|a| a.returned);
        let mut by_invoke: Vec<&Ack> = acks.iter().collect();
        by_invoke.sort_by_key(|a| a.invoked);
        // The acknowledgement with the newest epoch, and the one with the highest seq, among
        // those returned before the send at hand began.
        let (mut newest, mut highest): (Option<&Ack>, Option<&Ack>) = (None, None);
        let mut returned = by_return.iter().peekable();
        for ack in by_invoke {
            while let Some(done) = returned.next_if(|done| done.returned < ack.invoked) {
                newest = newest.filter(|n| n.epoch >= done.epoch).or(Some(done));
                if !behind.contains(&done.cell) {
                    highest = highest.filter(|h| h.seq >= done.seq).or(Some(done));
                }
            }
            if let Some(before) = newest.filter(|n| n.epoch > ack.epoch) {
                return Err(format!(
                    "{tenant}/{conversation}: two writers: {} was accepted by {} at epoch {} \
                     after {} had been by {} at epoch {}",
                    ack.id, ack.cell, ack.epoch, before.id, before.cell, before.epoch
                ));
            }
            if let Some(before) = highest.filter(|h| h.seq >= ack.seq) {
                return Err(format!(
                    "{tenant}/{conversation}: {} was given seq {} by {} after {} had seq {} from {}",
                    ack.id, ack.seq, ack.cell, before.id, before.seq, before.cell
                ));
            }
        }
    }
    Ok(())
}

/// Every acknowledged message is in the owner's history once, at its seq (any seq, for a cell
/// a failover left `behind`), seqs contiguous from 1; answers how many were checked.
pub async fn check_histories(
    messenger: &Messenger,
    acked: &Acked,
    behind: &Behind,
) -> Result<usize, String> {
    let mut checked = 0usize;
    for ((tenant, conversation), acks) in acked {
        let history = loop {
            match read_history(messenger, tenant, conversation).await {
                Ok(history) => break history,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let seqs: Vec<u64> = history.iter().map(|(seq, _)| *seq).collect();
        if seqs != (1..=seqs.len() as u64).collect::<Vec<_>>() {
            return Err(format!(
                "{tenant}/{conversation}: seqs are not 1..n: {seqs:?}"
            ));
        }
        let mut found: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (seq, id) in &history {
            found.entry(id.as_str()).or_default().push(*seq);
        }
        for ack in acks {
            match found.get(ack.id.as_str()).map(Vec::as_slice) {
                Some([at]) if *at == ack.seq || behind.contains(&ack.cell) => {}
                other => {
                    return Err(format!(
                        "{tenant}/{conversation}: {} acknowledged at seq {} by {}, found at {other:?}",
                        ack.id, ack.seq, ack.cell
                    ));
                }
            }
        }
        if let Some((id, at)) = found.iter().find(|(_, at)| at.len() > 1) {
            return Err(format!(
                "{tenant}/{conversation}: {id} written twice, at {at:?}"
            ));
        }
        checked += acks.len();
    }
    Ok(checked)
}

/// A conversation's whole history on the cell that owns it, oldest first: (seq, client id).
async fn read_history(
    messenger: &Messenger,
    tenant: &str,
    conversation: &str,
) -> Result<Vec<(u64, String)>, tonic::Status> {
    let mut history = Vec::new();
    let mut before_seq = 0;
    loop {
        let (_, mut client) = messenger.owner(tenant, conversation)?;
        let page = tokio::time::timeout(
            CALL_TIMEOUT,
            client.get_history(GetHistoryRequest {
                tenant_id: tenant.into(),
                conversation_id: conversation.into(),
                user_id: MEMBERS[0].into(),
                before_seq,
                limit: 200,
            }),
        )
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("history"))??
        .into_inner();
        history.extend(
            page.messages
                .iter()
                .map(|m| (m.seq, m.client_msg_id.clone())),
        );
        match page.messages.last() {
            Some(oldest) if page.has_more => before_seq = oldest.seq,
            _ => break,
        }
    }
    history.sort();
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(id: &str, seq: u64, cell: &str, epoch: u64, invoked: u64, returned: u64) -> Ack {
        Ack {
            id: id.into(),
            seq,
            cell: cell.into(),
            epoch,
            invoked: Duration::from_millis(invoked),
            returned: Duration::from_millis(returned),
        }
    }

    fn acked(acks: Vec<Ack>) -> Acked {
        BTreeMap::from([(("t".to_string(), "g0".to_string()), acks)])
    }

    #[test]
    fn a_handover_with_overlapping_sends_is_one_writer() {
        // The old owner's last send and the new owner's first overlap in time: either order.
        let acks = vec![
            ack("a", 1, "c1", 1, 0, 10),
            ack("b", 2, "c1", 1, 20, 60),
            ack("c", 3, "c2", 2, 30, 70),
            ack("d", 4, "c2", 2, 80, 90),
        ];
        assert!(one_writer(&acked(acks), &Behind::new()).is_ok());
    }

    #[test]
    fn a_fenced_owner_accepting_after_the_new_one_is_two_writers() {
        let acks = vec![
            ack("a", 1, "c1", 1, 0, 10),
            ack("b", 2, "c2", 2, 20, 30),
            ack("c", 3, "c1", 1, 40, 50),
        ];
        let behind = Behind::from(["c1".to_string()]);
        let err = one_writer(&acked(acks), &behind).unwrap_err();
        assert!(err.contains("two writers"), "{err}");
    }

    #[test]
    fn a_seq_given_again_after_it_was_acknowledged_is_two_writers() {
        let acks = vec![ack("a", 5, "c1", 1, 0, 10), ack("b", 5, "c2", 2, 20, 30)];
        let err = one_writer(&acked(acks.clone()), &Behind::new()).unwrap_err();
        assert!(err.contains("given seq 5"), "{err}");
        // Unless c1 was failed over from a standby that lacked seq 5: its successor reused
        // it, and the merge-back appends c1's message after.
        let behind = Behind::from(["c1".to_string()]);
        assert!(one_writer(&acked(acks), &behind).is_ok());
    }
}
