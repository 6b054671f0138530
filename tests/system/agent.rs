//! The agent as a process that can die: killed outright, its cells stop with it; restarted, it
//! brings them back from their disks and grants what changed while it was away.

use std::time::Duration;

use cellplane_api::proto::cell::CellStatusRequest;
use cellplane_api::proto::control::Tier;
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
    while cell.admin().cell_status(CellStatusRequest {}).await.is_ok() {
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
