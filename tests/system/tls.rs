//! `cellplane dev --tls`: every component talks over mTLS — nodes to nodes, agents to nodes
//! and cells, cells to their primaries, cellctl and the client library to all of them — each
//! identity reaches only what its role allows, and a client without a certificate, with one
//! of another CA, or with an expired one is refused at the handshake.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellplane_api::client::{Messenger, MessengerOptions, RouteCache, RouteCacheOptions};
use cellplane_api::proto::cell::cell_admin_client::CellAdminClient;
use cellplane_api::proto::cell::{CellStatusRequest, ConversationKind, CreateConversationRequest};
use cellplane_api::proto::control::control_client::ControlClient;
use cellplane_api::proto::control::{
    ClusterStatusRequest, CreateTenantRequest, DeleteTenantRequest, FailoverCellRequest,
    FailoverMode, GetTenantRequest, HeartbeatRequest, ListAuditRequest, ListCellsRequest,
    RenewLeasesRequest, Tier,
};
use cellplane_api::proto::routing::LookupRequest;
use cellplane_api::proto::routing::routing_client::RoutingClient;
use cellplane_api::tls::{Tls, TlsPaths};
use cellplane_control_plane::dev::certs::{Ca, dev_identity_names};
use cellplane_tests::traffic::send_request;
use cellplane_tests::{start_dev, stop_dev};
use serde_json::Value;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::cellctl::ok;

/// Calls ClusterStatus on `endpoint` with `tls`; answers whether it was answered.
async fn answered(endpoint: &str, tls: &Tls) -> Result<(), String> {
    let channel = tls
        .connect(endpoint, Duration::from_secs(2))
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    ControlClient::new(channel)
        .cluster_status(ClusterStatusRequest {})
        .await
        .map(|_| ())
        .map_err(|e| format!("call: {e:?}"))
}

/// Writes `identity` of `ca` as `name` into `dir`.
fn identity(ca: &Ca, dir: &Path, name: &str, expired: bool) -> TlsPaths {
    std::fs::create_dir_all(dir).expect("tls dir");
    let ca_path = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca_path, &ca.pem).expect("ca");
    ca.issue(name, expired)
        .expect("issue")
        .write(dir, name, &ca_path)
        .expect("write")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_talks_over_mtls_and_strangers_are_refused() {
    let dir = tempfile::Builder::new()
        .prefix("cellplane-dev-tls-")
        .tempdir()
        .expect("temp dir");
    let data = dir.path().join("data");
    // The dev system's identities, from a CA this test keeps, so it can issue an expired one.
    let ca = Ca::new("test CA").expect("ca");
    let tls_dir = data.join("tls");
    std::fs::create_dir_all(&tls_dir).expect("tls dir");
    std::fs::write(tls_dir.join("ca.pem"), &ca.pem).expect("ca");
    for name in dev_identity_names() {
        ca.issue(&format!("cellplane-{name}"), false)
            .expect("issue")
            .write(&tls_dir, &name, &tls_dir.join("ca.pem"))
            .expect("write");
    }
    let endpoints_file = dir.path().join("endpoints.json");
    let log = dir.path().join("dev.log");
    let mut dev = start_dev(&data, &endpoints_file, &log, &["--tls"]);
    let endpoints: Value =
        serde_json::from_str(&std::fs::read_to_string(&endpoints_file).expect("endpoints"))
            .expect("json");
    let admin: TlsPaths = serde_json::from_value(endpoints["tls"].clone()).expect("tls paths");
    let node = endpoints["control_plane"][0]
        .as_str()
        .expect("node")
        .to_string();

    // cellctl finds the operator's identity in the endpoints file. Every cell came up ACTIVE
    // (agents reach nodes and cells), and every protected primary's standby follows it (cells
    // reach their primaries).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let cells = ok(&endpoints_file, &["cells"]);
        let cells = cells.as_array().expect("cells");
        let protected = cells
            .iter()
            .filter(|c| c["standby_of"].is_null() && c["tier"] != "LOW");
        if cells.iter().all(|c| c["state"] == "ACTIVE")
            && protected.clone().all(|c| c["protection"] == "IN_SYNC")
        {
            break;
        }
        assert!(Instant::now() < deadline, "cells over mTLS: {cells:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let tenant = ok(
        &endpoints_file,
        &[
            "tenant",
            "create",
            "secure",
            "--tier",
            "NORMAL",
            "--region",
            "cn-hangzhou",
        ],
    );
    assert_eq!(tenant["tenant_id"], "secure", "{tenant}");

    // The client library: a route cache and a messenger with the operator's identity.
    let tls = Tls::load(&admin).expect("load");
    let routes = Arc::new(
        RouteCache::start(
            vec![node.clone()],
            RouteCacheOptions {
                tls: tls.clone(),
                ..RouteCacheOptions::default()
            },
        )
        .await
        .expect("route cache over mTLS"),
    );
    let messenger = Messenger::new(
        routes,
        MessengerOptions {
            tls: tls.clone(),
            ..MessengerOptions::default()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while messenger.owner("secure", "").is_err() {
        assert!(
            Instant::now() < deadline,
            "the cache never learned the tenant"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    messenger
        .create_conversation(CreateConversationRequest {
            tenant_id: "secure".into(),
            conversation_id: "c0".into(),
            kind: ConversationKind::Group as i32,
            member_ids: vec!["u0".into(), "u1".into()],
            route_epoch: 0,
        })
        .await
        .expect("create over mTLS");
    messenger
        .send_message(send_request("secure", "c0", "u0", "m1", b"hi".to_vec()))
        .await
        .expect("send over mTLS");

    // Roles: each identity reaches what its role allows and is refused the rest, with nothing
    // changed.
    let of = |name: &str| {
        Tls::load(&TlsPaths {
            ca: tls_dir.join("ca.pem"),
            cert: tls_dir.join(format!("{name}.pem")),
            key: tls_dir.join(format!("{name}-key.pem")),
        })
        .expect("load")
    };
    let control_as = |tls: &Tls| {
        ControlClient::new(
            tls.lazy_channel(&node, Duration::from_secs(2))
                .expect("channel"),
        )
    };
    let (reader, agent) = (of("reader"), of("agent-cn-hangzhou"));
    RoutingClient::new(
        reader
            .lazy_channel(&node, Duration::from_secs(2))
            .expect("channel"),
    )
    .lookup(LookupRequest {
        tenant_id: "secure".into(),
        ..Default::default()
    })
    .await
    .expect("a reader looks routes up");
    let denied = control_as(&reader)
        .create_tenant(CreateTenantRequest {
            tenant_id: "intruder".into(),
            tier: Tier::Normal as i32,
            home_region: "cn-hangzhou".into(),
        })
        .await
        .expect_err("a reader creates no tenant");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("cellplane-reader"), "{denied:?}");
    let denied = control_as(&agent)
        .failover_cell(FailoverCellRequest {
            cell_id: "hz-a-normal-1".into(),
            mode: FailoverMode::Forced as i32,
            reason: "not an agent's call".into(),
        })
        .await
        .expect_err("an agent fails no cell over");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = control_as(&agent)
        .delete_tenant(DeleteTenantRequest {
            tenant_id: "secure".into(),
        })
        .await
        .expect_err("an agent deletes no tenant");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    // An agent acts for its own region only: cn-beijing's may not report on a cell of
    // cn-hangzhou, nor renew its lease.
    let beijing = of("agent-cn-beijing");
    let hangzhou_cell = endpoints["cells"]
        .as_array()
        .expect("cells")
        .iter()
        .find(|c| c["region"] == "cn-hangzhou")
        .and_then(|c| c["cell_id"].as_str())
        .expect("a cn-hangzhou cell")
        .to_string();
    let denied = control_as(&beijing)
        .heartbeat(HeartbeatRequest {
            cell_id: hangzhou_cell.clone(),
            health: Some(Default::default()),
            ..Default::default()
        })
        .await
        .expect_err("another region's cell");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("cn-beijing"), "{denied:?}");
    let denied = control_as(&beijing)
        .renew_leases(RenewLeasesRequest {
            cell_ids: vec![hangzhou_cell.clone()],
        })
        .await
        .expect_err("another region's lease");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    control_as(&agent)
        .renew_leases(RenewLeasesRequest {
            cell_ids: vec![hangzhou_cell],
        })
        .await
        .expect("its own region's");
    let nobody = Tls::load(&identity(&ca, dir.path(), "nobody", false)).expect("load");
    let denied = control_as(&nobody)
        .list_cells(ListCellsRequest::default())
        .await
        .expect_err("a certificate of the CA with no role");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let missing = control_as(&tls)
        .get_tenant(GetTenantRequest {
            tenant_id: "intruder".into(),
        })
        .await
        .expect_err("nothing was created");
    assert_eq!(missing.code(), Code::NotFound);
    control_as(&tls)
        .get_tenant(GetTenantRequest {
            tenant_id: "secure".into(),
        })
        .await
        .expect("nothing was deleted");
    let cell_addr = endpoints["cells"][0]["endpoint"]
        .as_str()
        .expect("cell endpoint")
        .to_string();
    let cell_admin = |tls: &Tls| {
        CellAdminClient::new(
            tls.lazy_channel(&cell_addr, Duration::from_secs(2))
                .expect("channel"),
        )
    };
    let denied = cell_admin(&reader)
        .cell_status(CellStatusRequest { without_keys: true })
        .await
        .expect_err("a front end does not administer cells");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    cell_admin(&agent)
        .cell_status(CellStatusRequest { without_keys: true })
        .await
        .expect("an agent does");

    // The audit log names who made each admin call, the refused ones included; reading it
    // is an admin's call.
    let audit = control_as(&tls)
        .list_audit(ListAuditRequest::default())
        .await
        .expect("an admin reads the audit log")
        .into_inner();
    let find = |identity: &str, method: &str| {
        audit
            .entries
            .iter()
            .filter(|e| e.identity == identity && e.method == method)
            .collect::<Vec<_>>()
    };
    let created = find("cellplane-admin", "Control/CreateTenant");
    assert!(
        created
            .iter()
            .any(|e| e.code == 0 && e.request.contains("\"secure\"")),
        "{audit:#?}"
    );
    for (identity, method, asked) in [
        ("cellplane-reader", "Control/CreateTenant", "\"intruder\""),
        (
            "cellplane-agent-cn-hangzhou",
            "Control/FailoverCell",
            "not an agent's call",
        ),
        (
            "cellplane-agent-cn-hangzhou",
            "Control/DeleteTenant",
            "\"secure\"",
        ),
    ] {
        let refused = find(identity, method);
        assert_eq!(refused.len(), 1, "{identity} {method}: {audit:#?}");
        assert_eq!(refused[0].code, Code::PermissionDenied as i32);
        assert!(refused[0].request.contains(asked), "{:?}", refused[0]);
        assert!(
            refused[0].message.contains("needs role admin"),
            "{:?}",
            refused[0]
        );
        assert!(!refused[0].peer.is_empty());
    }
    assert!(
        find("cellplane-agent-cn-beijing", "Control/Heartbeat").is_empty(),
        "an agent's calls are not admin calls"
    );
    let by_cellctl = ok(
        &endpoints_file,
        &[
            "audit",
            "--identity",
            "cellplane-reader",
            "--method",
            "CreateTenant",
        ],
    );
    let by_cellctl = by_cellctl.as_array().expect("entries");
    assert_eq!(by_cellctl.len(), 1, "{by_cellctl:?}");
    assert_eq!(
        by_cellctl[0]["result"], "PermissionDenied",
        "{by_cellctl:?}"
    );
    let denied = control_as(&reader)
        .list_audit(ListAuditRequest::default())
        .await
        .expect_err("a reader reads no audit log");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // Strangers: no certificate, another CA's, an expired one of the right CA.
    answered(&node, &tls)
        .await
        .expect("the operator is answered");
    let refused = answered(&node, &Tls::plaintext()).await;
    assert!(refused.is_err(), "plaintext is refused: {refused:?}");
    let other = Tls::load(&identity(
        &Ca::new("another CA").expect("ca"),
        dir.path(),
        "stranger",
        false,
    ))
    .expect("load");
    let refused = answered(&node, &other).await;
    assert!(refused.is_err(), "another CA's certificate is refused");
    let expired = Tls::load(&identity(&ca, dir.path(), "expired", true)).expect("load");
    let refused = answered(&node, &expired).await;
    assert!(refused.is_err(), "an expired certificate is refused");
    let status = cell_admin(&Tls::plaintext())
        .cell_status(CellStatusRequest { without_keys: true })
        .await;
    assert!(status.is_err(), "a cell refuses plaintext too: {status:?}");

    // Every method of every service, against every identity: each call outside the caller's
    // roles is refused by the role check before any service sees it.
    let cell_addrs: Vec<String> = endpoints["cells"]
        .as_array()
        .expect("cells")
        .iter()
        .filter_map(|c| c["endpoint"].as_str().map(str::to_string))
        .take(1)
        .collect();
    let identities = [
        ("cellplane-reader", of("reader")),
        ("cellplane-agent-cn-hangzhou", of("agent-cn-hangzhou")),
        ("cellplane-admin", of("admin")),
        ("nobody", nobody.clone()),
    ];
    let refused = every_method_against_every_identity(
        &node,
        cellplane_control_plane::control::access::rules,
        &identities,
    )
    .await;
    assert!(refused > 60, "{refused} refusals on the node");
    let refused = every_method_against_every_identity(
        &cell_addrs[0],
        cellplane_im_cell::access::rules,
        &identities,
    )
    .await;
    assert!(refused > 20, "{refused} refusals on a cell");

    stop_dev(&mut dev, &data);
}

/// Calls every method of every cellplane service on `addr` (an empty request) as each of
/// `identities`, and checks that the calls the policy of the dev system refuses are refused
/// `PERMISSION_DENIED` by the role check, and the others are not; answers how many were
/// refused. Streams the policy allows are not opened.
async fn every_method_against_every_identity(
    addr: &str,
    rules: cellplane_api::auth::Rules,
    identities: &[(&str, Tls)],
) -> usize {
    use prost::Message;
    let policy =
        cellplane_api::auth::Policy::new(&cellplane_control_plane::dev::certs::dev_auth(), rules);
    let descriptors =
        prost_types::FileDescriptorSet::decode(cellplane_api::proto::FILE_DESCRIPTOR_SET)
            .expect("descriptors");
    let mut refused = 0;
    for file in &descriptors.file {
        for service in &file.service {
            let full = format!("{}.{}", file.package(), service.name());
            for method in &service.method {
                let path = format!("/{full}/{}", method.name());
                if rules(&path).is_none() && !full.starts_with("cellplane.") {
                    continue;
                }
                let streams = method.server_streaming() || method.client_streaming();
                for (identity, tls) in identities {
                    let denied = policy.check(Some(identity), &path).is_err();
                    if streams && !denied {
                        continue;
                    }
                    let channel = tls
                        .lazy_channel(addr, Duration::from_secs(2))
                        .expect("channel");
                    let mut grpc = tonic::client::Grpc::new(channel);
                    let answer: Result<tonic::Response<()>, tonic::Status> = async {
                        grpc.ready()
                            .await
                            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                        let mut request = tonic::Request::new(());
                        request.set_timeout(Duration::from_secs(3));
                        grpc.unary(
                            request,
                            tonic::codegen::http::uri::PathAndQuery::try_from(path.as_str())
                                .expect("path"),
                            tonic_prost::ProstCodec::<(), ()>::default(),
                        )
                        .await
                    }
                    .await;
                    let by_role_check = answer
                        .as_ref()
                        .err()
                        .filter(|s| s.code() == Code::PermissionDenied)
                        .is_some_and(|s| s.message().contains("may not call"));
                    assert_eq!(
                        by_role_check, denied,
                        "{identity} calling {path} on {addr}: {answer:?}"
                    );
                    refused += usize::from(denied);
                }
            }
        }
    }
    refused
}

/// Asks the health service at `addr` over a new channel of `tls`.
async fn healthy(addr: &str, tls: &Tls) -> Result<(), String> {
    let channel = tls
        .connect(addr, Duration::from_secs(2))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| format!("call: {e}"))
}

/// Certificates rotate without a restart, on both sides: a server takes up a new CA and its
/// new certificate, a client its new identity, each for the connections it makes next. Runs
/// the servers' and clients' own TLS code (`cellplane_api::tls`) in this process, with real
/// files and real handshakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_are_used_without_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (old_ca, new_ca) = (
        Ca::new("old CA").expect("ca"),
        Ca::new("new CA").expect("ca"),
    );
    let old_ca_pem = dir.path().join("old-ca.pem");
    let new_ca_pem = dir.path().join("new-ca.pem");
    std::fs::write(&old_ca_pem, &old_ca.pem).expect("ca");
    std::fs::write(&new_ca_pem, &new_ca.pem).expect("ca");
    let issue = |ca: &Ca, sub: &str, ca_pem: &Path| {
        let at = dir.path().join(sub);
        std::fs::create_dir_all(&at).expect("dir");
        let paths = ca
            .issue(&format!("cellplane-{sub}"), false)
            .expect("issue")
            .write(&at, "id", ca_pem)
            .expect("write");
        // Each side has its own copy of the CA file, rotated on its own.
        let own_ca = at.join("ca.pem");
        std::fs::copy(ca_pem, &own_ca).expect("copy ca");
        TlsPaths {
            ca: own_ca,
            ..paths
        }
    };
    let server_files = issue(&old_ca, "server", &old_ca_pem);
    let client_files = issue(&old_ca, "client", &old_ca_pem);
    let newcomer = Tls::load(&issue(&new_ca, "newcomer", &new_ca_pem)).expect("load");

    let server_tls = Tls::load(&server_files).expect("server files");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(server_tls.incoming(listener)),
    );
    let client = Tls::load(&client_files).expect("client files");
    healthy(&addr, &client).await.expect("same CA");
    assert!(healthy(&addr, &newcomer).await.is_err(), "another CA");
    let open = client
        .connect(&addr, Duration::from_secs(2))
        .await
        .expect("an open connection");

    // The server moves to the new CA: its files change under it.
    let rotated = new_ca
        .issue("cellplane-server", false)
        .expect("issue")
        .write(
            server_files.cert.parent().expect("dir"),
            "id",
            &server_files.ca,
        )
        .expect("write");
    assert_eq!(rotated.cert, server_files.cert);
    std::fs::copy(&new_ca_pem, &server_files.ca).expect("rotate ca");
    let deadline = Instant::now() + Duration::from_secs(10);
    while healthy(&addr, &newcomer).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the server never took up its new files"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused = healthy(&addr, &client).await;
    assert!(refused.is_err(), "the old CA's client is refused now");
    HealthClient::new(open)
        .check(HealthCheckRequest::default())
        .await
        .expect("an open connection keeps what it was made with");

    // The client moves too, and its next connection presents the new identity.
    new_ca
        .issue("cellplane-client", false)
        .expect("issue")
        .write(
            client_files.cert.parent().expect("dir"),
            "id",
            &client_files.ca,
        )
        .expect("write");
    std::fs::copy(&new_ca_pem, &client_files.ca).expect("rotate ca");
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(error) = healthy(&addr, &client).await {
        assert!(
            Instant::now() < deadline,
            "the client never took up its new files: {error}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A rotation that does not load (a truncated certificate) leaves the last good files in
    // use.
    std::fs::write(&server_files.cert, "-----BEGIN CERTIFICATE-----\n").expect("truncate");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    healthy(&addr, &client)
        .await
        .expect("the server keeps its last good files");
}
