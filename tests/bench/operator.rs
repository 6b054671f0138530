//! The operator: how long a `Tenant` takes from its apply to `Ready`, one at a time and a
//! hundred at once, and a `Migration` from its apply to DONE beside the same migration through
//! `cellctl migrate --wait`. A real API server (`scripts/ensure-tools.sh kube-apiserver`), a
//! 3-node control plane, an agent with two NORMAL cells and one operator replica, all release
//! binaries on loopback; the bench sees objects through a watch, as `kubectl wait` would.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellplane_api::proto::control::Tier as PbTier;
use cellplane_crds::{Migration, MigrationSpec, Tenant, TenantSpec, Tier};
use cellplane_tests::apiserver::KubeApiServer;
use cellplane_tests::measure::{Samples, ms};
use cellplane_tests::operator::OperatorProcess;
use cellplane_tests::system::System;
use cellplane_tests::traffic::{MEMBERS, create_groups, send_request};
use futures::StreamExt;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};

use crate::report::Report;

const CELLS: [&str; 2] = ["hz-a-normal-1", "hz-b-normal-2"];
const MOVED: &str = "moved";
const MOVED_GROUPS: usize = 4;
const MOVED_MESSAGES: usize = 200;
const LIMIT: Duration = Duration::from_secs(60);

/// When the watch first saw each object reach its goal, by name.
type Seen = Arc<Mutex<HashMap<String, Instant>>>;

/// Records, from a watch, when each `K` first satisfies `reached`.
fn watch_for<K>(api: Api<K>, reached: fn(&K) -> bool) -> Seen
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let seen: Seen = Arc::default();
    let recorded = seen.clone();
    tokio::spawn(async move {
        let mut objects = watcher(api, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Some(Ok(object)) = objects.next().await {
            if reached(&object) {
                let name = object.meta().name.clone().unwrap_or_default();
                recorded
                    .lock()
                    .expect("seen")
                    .entry(name)
                    .or_insert_with(Instant::now);
            }
        }
    });
    seen
}

/// Waits until the watch has seen `name` reach its goal; answers when it did.
async fn reached(seen: &Seen, name: &str) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(at) = seen.lock().expect("seen").get(name) {
            return Ok(*at);
        }
        anyhow::ensure!(Instant::now() < deadline, "{name} not there in {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn ready(tenant: &Tenant) -> bool {
    tenant.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

fn done(migration: &Migration) -> bool {
    migration
        .status
        .as_ref()
        .is_some_and(|s| s.phase.as_deref() == Some("DONE"))
}

fn row(label: &str, samples: &mut Samples) -> String {
    format!(
        "| {label} | {} | {} | {} | {} |\n",
        samples.len(),
        ms(samples.percentile(50.0)),
        ms(samples.percentile(99.0)),
        ms(samples.percentile(100.0)),
    )
}

pub async fn run(report: &mut Report, tenants: usize, migrations: usize) -> anyhow::Result<()> {
    let system = System::start(&[(
        "hz",
        &[(CELLS[0], "a", "NORMAL"), (CELLS[1], "b", "NORMAL")],
    )])
    .await;
    let server = KubeApiServer::start().await;
    server.install_crds().await;
    let logs = tempfile::tempdir()?;
    let _operator = OperatorProcess::start(
        &server,
        &system.cluster.endpoints(),
        "bench-operator",
        logs.path().join("operator.log"),
        &[],
    );
    let client = server.client();
    let tenant_api: Api<Tenant> = Api::all(client.clone());
    let migration_api: Api<Migration> = Api::all(client.clone());
    let tenants_ready = watch_for(tenant_api.clone(), ready);
    let migrations_done = watch_for(migration_api.clone(), done);
    let pp = PostParams::default();
    let tenant = |name: String| {
        Tenant::new(
            &name,
            TenantSpec {
                tier: Tier::Normal,
                home_region: "hz".into(),
            },
        )
    };

    // Warm-up: the operator has leased, listed and connected before anything is timed.
    tenant_api.create(&pp, &tenant("warm-up".into())).await?;
    reached(&tenants_ready, "warm-up").await?;

    eprintln!("operator: {tenants} tenants one at a time");
    let mut one_at_a_time = Samples::default();
    for i in 0..tenants {
        let name = format!("one-{i}");
        let applied = Instant::now();
        tenant_api.create(&pp, &tenant(name.clone())).await?;
        one_at_a_time.record(reached(&tenants_ready, &name).await? - applied);
    }

    eprintln!("operator: {tenants} tenants at once");
    let mut at_once = Samples::default();
    let burst = Instant::now();
    let mut applied = Vec::with_capacity(tenants);
    for i in 0..tenants {
        let name = format!("burst-{i}");
        applied.push((name.clone(), Instant::now()));
        tenant_api.create(&pp, &tenant(name)).await?;
    }
    let mut last = burst;
    for (name, at) in &applied {
        let ready_at = reached(&tenants_ready, name).await?;
        at_once.record(ready_at - *at);
        last = last.max(ready_at);
    }
    let all_ready = last - burst;

    // One tenant with some history, moved back and forth: through a Migration object and
    // through cellctl in turn.
    let mut home = system.create_tenant(MOVED, PbTier::Normal, "hz").await;
    let (_, messenger) = system.messenger().await;
    create_groups(&messenger, MOVED, MOVED_GROUPS).await;
    for n in 0..MOVED_MESSAGES {
        messenger
            .send_message(send_request(
                MOVED,
                &cellplane_tests::traffic::conversation(n % MOVED_GROUPS),
                MEMBERS[n % MEMBERS.len()],
                &format!("m-{n}"),
                vec![b'x'; 200],
            ))
            .await?;
    }
    eprintln!("operator: {migrations} migrations each way");
    let mut through_operator = Samples::default();
    let mut through_cellctl = Samples::default();
    let endpoints = system.cluster.endpoints().join(",");
    for i in 0..migrations * 2 {
        let target = if home == CELLS[0] { CELLS[1] } else { CELLS[0] };
        if i % 2 == 0 {
            let name = format!("move-{i}");
            let object = Migration::new(
                &name,
                MigrationSpec {
                    tenant: MOVED.into(),
                    conversation: None,
                    target_cell: target.into(),
                },
            );
            let applied = Instant::now();
            migration_api.create(&pp, &object).await?;
            through_operator.record(reached(&migrations_done, &name).await? - applied);
        } else {
            let started = Instant::now();
            let output = tokio::process::Command::new(cellplane_tests::binary("cellctl"))
                .args(["--endpoints", &endpoints, "migrate", MOVED, "--to", target])
                .arg("--wait")
                .output()
                .await?;
            anyhow::ensure!(
                output.status.success(),
                "cellctl migrate to {target} exited {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
            through_cellctl.record(started.elapsed());
        }
        home = target.to_string();
    }

    let mut text = String::from(
        "## Operator\n\n\
         A real Kubernetes API server (the apiextensions server over etcd, \
         `scripts/ensure-tools.sh kube-apiserver`), a 3-node control plane, one agent with two \
         NORMAL cells and one operator replica, release binaries on loopback. Times are from the \
         create call to the first watch event showing the goal, as `kubectl wait` would see it.\n\n\
         | measure | n | p50 (ms) | p99 (ms) | max (ms) |\n|---|---|---|---|---|\n",
    );
    text.push_str(&row(
        "Tenant apply → Ready, one at a time",
        &mut one_at_a_time,
    ));
    text.push_str(&row(
        &format!("Tenant apply → Ready, {tenants} at once"),
        &mut at_once,
    ));
    text.push_str(&row("Migration apply → DONE", &mut through_operator));
    text.push_str(&row(
        "`cellctl migrate --wait`, start → exit",
        &mut through_cellctl,
    ));
    text.push_str(&format!(
        "\nThe {tenants} tenants applied at once were all Ready {} ms after the first create. \
         Each migration moves one tenant of {MOVED_GROUPS} groups and {MOVED_MESSAGES} messages \
         between the two cells, alternately through a `Migration` object and through `cellctl`.\n",
        ms(all_ready)
    ));
    report.section(text);
    Ok(())
}
