//! The agent as a process that can die: killed outright, its cells stop with it; restarted, it
//! brings them back from their disks and grants what changed while it was away.

use std::time::Duration;

use cellplane_api::proto::cell::CellStatusRequest;
use cellplane_api::proto::control::Tier;
use cellplane_tests::agent::AgentProcess;
use cellplane_tests::processes_mentioning;
use cellplane_tests::traffic::{MEMBERS, create_groups, history, send_request};

use super::System;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_agent_restores_its_cells_and_grants_what_changed_meanwhile() {
    let mut system = System::start(&[("hz", &[("hz-a-normal-1", "a", "NORMAL")])]).await;
    system.create_tenant("before", Tier::Normal, "hz").await;
    let (_, messenger) = system.messenger().await;
    create_groups(&messenger, "before", 1).await;
    messenger
        .send_message(send_request(
            "before",
            "c0",
            MEMBERS[0],
            "one",
            b"1".to_vec(),
        ))
        .await
        .expect("send");

    system.agents[0].kill().await;
    let cell = system.agents[0].cell("hz-a-normal-1").clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cell
        .admin()
        .cell_status(CellStatusRequest::default())
        .await
        .is_ok()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cell outlived its agent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A tenant placed while no agent runs the cell: nobody has granted it yet.
    system.create_tenant("during", Tier::Normal, "hz").await;

    system.agents[0].restart();
    system.agents[0]
        .wait_for_cells(Duration::from_secs(30))
        .await;
    create_groups(&messenger, "during", 1).await;
    messenger
        .send_message(send_request(
            "during",
            "c0",
            MEMBERS[0],
            "first",
            b"1".to_vec(),
        ))
        .await
        .expect("the new tenant was granted by the reload");
    messenger
        .send_message(send_request(
            "before",
            "c0",
            MEMBERS[0],
            "two",
            b"2".to_vec(),
        ))
        .await
        .expect("the old grant survived on the cell's disk");
    let (_, mut owner) = messenger.owner("before", "c0").expect("owner");
    let seen: Vec<String> = history(&mut owner, "before", "c0")
        .await
        .into_iter()
        .map(|m| m.client_msg_id)
        .collect();
    assert_eq!(seen, ["one", "two"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_tenant_is_revoked_and_dropped_on_its_cell() {
    use cellplane_api::detail::wrong_cell;
    use cellplane_api::proto::cell::GetHistoryRequest;
    use cellplane_api::proto::control::DeleteTenantRequest;

    let system = System::start(&[("hz", &[("hz-a-normal-1", "a", "NORMAL")])]).await;
    system.create_tenant("gone", Tier::Normal, "hz").await;
    let (_, messenger) = system.messenger().await;
    create_groups(&messenger, "gone", 1).await;
    messenger
        .send_message(send_request("gone", "c0", MEMBERS[0], "one", b"1".to_vec()))
        .await
        .expect("send");
    let leader = system.cluster.wait_for_leader().await;
    system
        .cluster
        .control(leader)
        .delete_tenant(DeleteTenantRequest {
            tenant_id: "gone".into(),
        })
        .await
        .expect("delete");

    let cell = system.agents[0].cell("hz-a-normal-1").clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut late = send_request("gone", "c0", MEMBERS[0], "late", b"2".to_vec());
        late.route_epoch = 1;
        match cell.messaging().send_message(late).await {
            Err(status) if wrong_cell(&status).is_some() => {
                assert!(status.message().contains("no longer exists"), "{status:?}");
                break;
            }
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the deleted tenant is still writable: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let history = cell
            .messaging()
            .get_history(GetHistoryRequest {
                tenant_id: "gone".into(),
                conversation_id: "c0".into(),
                user_id: MEMBERS[0].into(),
                before_seq: 0,
                limit: 10,
            })
            .await;
        if history
            .as_ref()
            .is_err_and(|s| s.code() == tonic::Code::NotFound)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deleted tenant's rows are still there: {history:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_keeps_a_moved_tenant_as_a_backup_when_configured() {
    use cellplane_api::proto::control::MigrateTenantRequest;

    let system = System::start_with(
        &["--migration-keep-source-data"],
        &[(
            "hz",
            &[
                ("hz-a-normal-1", "a", "NORMAL"),
                ("hz-b-normal-2", "b", "NORMAL"),
            ],
        )],
    )
    .await;
    let source = system.create_tenant("kept", Tier::Normal, "hz").await;
    let (_, messenger) = system.messenger().await;
    create_groups(&messenger, "kept", 1).await;
    messenger
        .send_message(send_request("kept", "c0", MEMBERS[0], "one", b"1".to_vec()))
        .await
        .expect("send");
    let leader = system.cluster.wait_for_leader().await;
    let migration = system
        .cluster
        .control(leader)
        .migrate_tenant(MigrateTenantRequest {
            tenant_id: "kept".into(),
            target_cell: String::new(),
        })
        .await
        .expect("migrate")
        .into_inner();
    let done = system
        .wait_for_migration(&migration.migration_id, Duration::from_secs(30))
        .await;
    assert_eq!(super::phase_name(&done), "MIGRATION_PHASE_DONE", "{done:?}");
    assert!(
        done.keep_source_data && done.purge_after_ms == 0,
        "{done:?}"
    );
    // The source still holds the history, and still refuses writes to it.
    let mut old = system.agents[0].cell(&source).messaging();
    let kept: Vec<String> = history(&mut old, "kept", "c0")
        .await
        .into_iter()
        .map(|m| m.client_msg_id)
        .collect();
    assert_eq!(kept, ["one"]);
    let mut late = send_request("kept", "c0", MEMBERS[0], "late", b"2".to_vec());
    late.route_epoch = 1;
    assert!(
        old.send_message(late).await.is_err(),
        "the backup takes no writes"
    );
}

/// An agent that cannot reach its control plane keeps trying to register its cells; SIGTERM
/// must still stop it, and its cells with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_reached_its_control_plane_stops_on_sigterm() {
    let nowhere = vec![format!("127.0.0.1:{}", cellplane_tests::free_port())];
    let mut agent = AgentProcess::start(
        "cn-hangzhou",
        &nowhere,
        &[("lonely-1", "hz-a", "NORMAL")],
        &[],
    );
    let data = agent.dir.path().join("data").to_string_lossy().into_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // The cell's command line names its data directory under the agent's.
    while processes_mentioning(&data) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent did not start its cell"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = agent
        .terminate(Duration::from_secs(15))
        .await
        .expect("the agent stops within 15 s of SIGTERM");
    assert!(status.success(), "{status}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while processes_mentioning(&data) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent's cell outlived it"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An agent whose control plane went away stops promptly on SIGTERM: its heartbeats, retrying
/// against nobody, do not hold it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_lost_its_control_plane_stops_promptly_on_sigterm() {
    let mut system = System::start(&[(
        "hz",
        &[
            ("hz-a-normal-1", "a", "NORMAL"),
            ("hz-b-normal-1", "b", "NORMAL"),
        ],
    )])
    .await;
    for id in system.cluster.running_ids() {
        system.cluster.kill(id).await;
    }
    // Long enough for a round of heartbeats to be retrying against the dead control plane.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = system.agents[0]
        .terminate(Duration::from_secs(5))
        .await
        .expect("the agent stops within 5 s of SIGTERM");
    assert!(status.success(), "{status}");
}
