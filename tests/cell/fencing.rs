//! Fencing through the admin API of a real cell: grants, revocations, deletes and freezes that
//! arrive late or twice never move a key's epoch back, never fence its current owner, and
//! survive a restart.

use cellplane_api::detail::wrong_cell;
use cellplane_api::proto::cell::{
    CellStatusRequest, ConversationKind, CreateConversationRequest, GrantRequest, KeyRequest,
    RevokeRequest,
};
use cellplane_tests::cell::CellProcess;
use tonic::Code;

use super::send;

async fn send_at(cell: &CellProcess, epoch: u64, id: &str) -> Result<u64, tonic::Status> {
    let mut request = send("t", "g", "alice", id, b"hello");
    request.route_epoch = epoch;
    cell.messaging()
        .send_message(request)
        .await
        .map(|r| r.into_inner().seq)
}

async fn revoke(cell: &CellProcess, new_cell: &str, new_epoch: u64) {
    cell.admin()
        .revoke(RevokeRequest {
            tenant_id: "t".into(),
            conversation_id: String::new(),
            new_cell_id: new_cell.into(),
            new_epoch,
        })
        .await
        .expect("revoke");
}

fn key() -> KeyRequest {
    KeyRequest {
        tenant_id: "t".into(),
        conversation_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_grant_changes_never_fence_the_current_owner() {
    let mut cell = CellProcess::start("cell-a", &[]).await;
    cell.grant("t", "", 5).await;
    cell.messaging()
        .create_conversation(CreateConversationRequest {
            tenant_id: "t".into(),
            conversation_id: "g".into(),
            kind: ConversationKind::Group as i32,
            member_ids: vec!["alice".into(), "bob".into()],
            route_epoch: 5,
        })
        .await
        .expect("create");
    assert_eq!(send_at(&cell, 5, "m1").await.expect("send at 5"), 1);

    // The tenant moves to cell-b at 6, then back here at 7.
    revoke(&cell, "cell-b", 6).await;
    let moved = send_at(&cell, 5, "m2").await.expect_err("revoked");
    let detail = wrong_cell(&moved).expect("WrongCell");
    assert_eq!(
        (detail.current_cell_id.as_str(), detail.current_epoch),
        ("cell-b", 6)
    );
    cell.grant("t", "", 7).await;
    assert_eq!(send_at(&cell, 7, "m3").await.expect("send at 7"), 2);

    // The revocation towards cell-b at 6, and a delete of the key as it was at 6, arrive again
    // late: both are older than the grant at 7 and change nothing.
    revoke(&cell, "cell-b", 6).await;
    revoke(&cell, "", 6).await;
    assert_eq!(send_at(&cell, 7, "m4").await.expect("still the owner"), 3);
    // Granting the epoch held again is accepted and changes nothing.
    cell.grant("t", "", 7).await;
    // A grant older than the one held is refused, and nothing changes.
    let stale = cell
        .admin()
        .grant(GrantRequest {
            tenant_id: "t".into(),
            conversation_id: String::new(),
            epoch: 6,
        })
        .await
        .expect_err("a grant at 6 after 7");
    assert_eq!(stale.code(), Code::InvalidArgument, "{stale:?}");
    assert!(stale.message().contains("epoch"), "{stale:?}");
    assert_eq!(send_at(&cell, 7, "m5").await.expect("still at 7"), 4);

    // A freeze holds against a repeated grant of the same epoch; only a thaw lifts it.
    cell.admin().freeze(key()).await.expect("freeze");
    cell.grant("t", "", 7).await;
    let frozen = send_at(&cell, 7, "m6").await.expect_err("frozen");
    assert!(wrong_cell(&frozen).is_some_and(|d| d.frozen), "{frozen:?}");
    cell.admin().unfreeze(key()).await.expect("unfreeze");
    assert_eq!(send_at(&cell, 7, "m6").await.expect("thawed"), 5);

    // All of it is on disk.
    cell.kill().await;
    cell.restart().await;
    assert_eq!(send_at(&cell, 7, "m7").await.expect("after restart"), 6);
    assert!(
        send_at(&cell, 6, "m8").await.is_err(),
        "epoch 6 stays fenced"
    );

    // The tenant is deleted at 7: writes are refused for good, and a tenant created again
    // under the same id (at a higher epoch) is granted it again.
    revoke(&cell, "", 7).await;
    let gone = send_at(&cell, 7, "m9").await.expect_err("deleted");
    assert!(gone.message().contains("no longer exists"), "{gone:?}");
    let regrant = cell
        .admin()
        .grant(GrantRequest {
            tenant_id: "t".into(),
            conversation_id: String::new(),
            epoch: 7,
        })
        .await
        .expect_err("the deleted epoch is not granted again");
    assert_eq!(regrant.code(), Code::InvalidArgument, "{regrant:?}");
    cell.grant("t", "", 8).await;

    // The status lists the keys held, unless asked not to (for callers that poll it often).
    let full = cell.status().await;
    assert_eq!(full.keys.len(), 1, "{:?}", full.keys);
    let light = cell
        .admin()
        .cell_status(CellStatusRequest { without_keys: true })
        .await
        .expect("status")
        .into_inner();
    assert!(light.keys.is_empty());
    assert_eq!(light.last_lsn, full.last_lsn);
}
