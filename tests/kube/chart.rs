//! The Helm chart with real helm 4, kubectl, the Kubernetes API schemas and a real API server:
//! it lints and renders with the default values and a two-region HIGH/NORMAL/LOW file; what it
//! renders is valid Kubernetes (for the oldest and newest versions it supports), is laid out as
//! a production control plane needs, and carries configs the binaries accept; bad values are
//! refused naming the value; its CRDs apply to a real API server.
//!
//! This API server serves CRDs only, so the built-in kinds (StatefulSet, Service, RBAC) are
//! checked against the schemas instead of applied.

use std::collections::BTreeSet;

use cellplane_cell_agent::config::AgentConfig;
use cellplane_control_plane::config::NodeConfig;
use cellplane_tests::apiserver::KubeApiServer;
use cellplane_tests::helm::{
    chart, helm, kubectl, kubernetes_validate, named, of_kind, render, run,
};
use cellplane_tests::rbac::{Attributes, allows, attributes, grants};
use serde_json::Value;

const TWO_REGIONS: &str = "ci/two-regions-values.yaml";
/// The release's namespace; an operator checked against the chart's RBAC keeps its Lease here
/// (`--namespace`).
pub const NAMESPACE: &str = "cellplane";

fn two_regions() -> String {
    chart().join(TWO_REGIONS).display().to_string()
}

/// Every values file the chart is tested with: `helm template` arguments.
fn values_files() -> Vec<Vec<String>> {
    vec![vec![], vec!["-f".into(), two_regions()]]
}

fn rendered(args: &[String]) -> Vec<Value> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    render("cellplane", NAMESPACE, &args).unwrap_or_else(|e| panic!("helm template: {e}"))
}

/// A file of `key` in the ConfigMap `name`.
fn config_file(objects: &[Value], name: &str, key: &str) -> String {
    named(objects, "ConfigMap", name)["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("{name} has no {key}"))
        .to_string()
}

#[test]
fn the_chart_lints_and_renders_objects_valid_for_kubernetes_1_29_and_1_36_with_its_notes() {
    let dir = crate::scratch();
    let chart = chart();
    for args in values_files() {
        let mut lint = vec!["lint", "--strict", chart.to_str().expect("path")];
        lint.extend(args.iter().map(String::as_str));
        let output = run(&helm(), &lint);
        assert!(
            output.status.success(),
            "helm lint {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );

        // The notes an install prints say how to reach cellctl.
        let mut install = vec![
            "install",
            "cellplane",
            chart.to_str().expect("path"),
            "-n",
            NAMESPACE,
            "--dry-run=client",
        ];
        install.extend(args.iter().map(String::as_str));
        let output = run(&helm(), &install);
        let printed = String::from_utf8_lossy(&output.stdout);
        let notes = printed.split("NOTES:").nth(1).unwrap_or_default();
        assert!(
            notes.contains("cellctl --endpoints cellplane-control-plane.cellplane.svc:7001"),
            "{args:?}: {printed}"
        );

        let objects = rendered(&args);
        let file = dir.path().join("rendered.json");
        // kubernetes-validate reads YAML, of which JSON documents are a part.
        let text: Vec<String> = objects.iter().map(Value::to_string).collect();
        std::fs::write(&file, text.join("\n---\n")).expect("write rendered");
        for version in ["1.29.0", "1.36.0"] {
            let output = run(
                &kubernetes_validate(),
                &["--strict", "-k", version, file.to_str().expect("path")],
            );
            let report = String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{args:?} on {version}:\n{report}");
            let passed = report.matches(" passed for resource ").count();
            // The ServiceMonitor's schema is the Prometheus Operator's CRD, not Kubernetes'.
            let monitors = of_kind(&objects, "ServiceMonitor").len();
            assert_eq!(passed + monitors, objects.len(), "{args:?}:\n{report}");
            assert!(!report.contains("ERROR"), "{report}");
        }
    }
}

#[test]
fn the_control_plane_keeps_a_quorum_through_zone_loss_and_evictions() {
    for (args, voters) in values_files().into_iter().zip([3u64, 5]) {
        let objects = rendered(&args);
        let nodes = named(&objects, "StatefulSet", "cellplane-control-plane");
        let spec = &nodes["spec"];
        assert_eq!(spec["replicas"], voters);
        assert_eq!(spec["podManagementPolicy"], "Parallel");
        assert_eq!(spec["serviceName"], "cellplane-control-plane-peers");
        let pod = &spec["template"]["spec"];
        let spread = &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            [0];
        assert_eq!(spread["topologyKey"], "topology.kubernetes.io/zone");
        assert_eq!(
            spread["labelSelector"]["matchLabels"],
            spec["selector"]["matchLabels"]
        );
        let claim = &spec["volumeClaimTemplates"][0];
        assert_eq!(claim["metadata"]["name"], "data");
        assert_eq!(pod["containers"][0]["volumeMounts"][0]["name"], "data");

        let budget = named(&objects, "PodDisruptionBudget", "cellplane-control-plane");
        assert_eq!(budget["spec"]["minAvailable"], voters / 2 + 1);

        let peers = named(&objects, "Service", "cellplane-control-plane-peers");
        assert_eq!(peers["spec"]["clusterIP"], "None");
        assert_eq!(peers["spec"]["publishNotReadyAddresses"], true);

        // Each node's id is its ordinal plus one: run the container's command with a stand-in
        // for the binary that prints what it was given.
        let container = &pod["containers"][0];
        let script = container["args"][0].as_str().expect("script");
        let dir = crate::scratch();
        let fake = dir.path().join("cellplane");
        std::fs::write(&fake, "#!/bin/sh\necho \"$@\"\n").expect("write stand-in");
        std::process::Command::new("chmod")
            .args(["+x", fake.to_str().expect("path")])
            .status()
            .expect("chmod");
        let last = voters - 1;
        let output = std::process::Command::new(container["command"][0].as_str().expect("sh"))
            .args(["-c", script])
            .env("PATH", format!("{}:/usr/bin:/bin", dir.path().display()))
            .env("HOSTNAME", format!("cellplane-control-plane-{last}"))
            .output()
            .expect("run the node's command");
        let printed = String::from_utf8_lossy(&output.stdout);
        assert!(
            printed.contains(&format!("--node-id {voters}")),
            "{script} printed {printed}"
        );

        // The node.toml every node shares is one the node accepts with each of their ids.
        let text = config_file(&objects, "cellplane-control-plane", "node.toml");
        let config = NodeConfig::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(config.peers.keys().copied().eq(1..=voters));
        for id in 1..=voters {
            let mut node = config.clone();
            node.node_id = id;
            node.validate().unwrap_or_else(|e| panic!("node {id}: {e}"));
            assert_eq!(
                config.peers[&id],
                format!(
                    "cellplane-control-plane-{}.cellplane-control-plane-peers.{NAMESPACE}.svc.cluster.local:7001",
                    id - 1
                )
            );
        }
    }
}

#[test]
fn every_region_gets_one_agent_whose_cells_and_standbys_are_reachable_by_name() {
    let objects = rendered(&values_files()[1]);
    let agents: Vec<&Value> = of_kind(&objects, "Deployment")
        .into_iter()
        .filter(|d| d["metadata"]["labels"]["app.kubernetes.io/component"] == "cell-agent")
        .collect();
    assert_eq!(agents.len(), 2);
    let mut tiers = BTreeSet::new();
    for region in ["cn-hangzhou", "cn-beijing"] {
        let name = format!("cellplane-agent-{region}");
        let agent = named(&objects, "Deployment", &name);
        assert_eq!(agent["spec"]["replicas"], 1);
        assert_eq!(agent["spec"]["strategy"]["type"], "Recreate");
        let args = &agent["spec"]["template"]["spec"]["containers"][0]["args"];
        assert!(
            args.as_array()
                .expect("args")
                .contains(&Value::from(format!("--region={region}"))),
            "{args}"
        );
        let text = config_file(&objects, &name, "agent.toml");
        let config = AgentConfig::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(config.tls.is_some() && config.cell_auth.is_some());
        let service = named(&objects, "Service", &name);
        let ports: BTreeSet<u64> = service["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| p["port"].as_u64().expect("port"))
            .collect();
        for cell in &config.cells {
            tiers.insert(cell.tier.clone());
            let port = cell.listen.port();
            assert!(cell.listen.ip().is_unspecified());
            assert_eq!(
                cell.endpoint(),
                format!("{name}.{NAMESPACE}.svc.cluster.local:{port}")
            );
            assert!(ports.contains(&u64::from(port)), "{name} lacks {port}");
        }
    }
    assert_eq!(tiers.len(), 3, "cells of every tier: {tiers:?}");

    // The HIGH primary's remote standby, run by the other region's agent, follows it at the
    // address its own region's Service gives it.
    let beijing = AgentConfig::from_toml(&config_file(
        &objects,
        "cellplane-agent-cn-beijing",
        "agent.toml",
    ))
    .expect("agent.toml");
    let remote = beijing
        .cells
        .iter()
        .find(|c| c.standby_of.as_deref() == Some("hz-a-high-1"))
        .expect("remote standby");
    assert_eq!(
        remote.primary_endpoint.as_deref(),
        Some("cellplane-agent-cn-hangzhou.cellplane.svc.cluster.local:7100")
    );
}

#[test]
fn the_operator_runs_under_its_own_account_with_probes_and_tls() {
    let objects = rendered(&values_files()[1]);
    let operator = named(&objects, "Deployment", "cellplane-operator");
    let pod = &operator["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "cellplane-operator");
    let container = &pod["containers"][0];
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["grpc"]["port"], 8081, "{probe}");
    }
    let env: Vec<&str> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| e["name"].as_str().expect("name"))
        .collect();
    for needed in [
        "POD_NAME",
        "POD_NAMESPACE",
        "CELLPLANE_TLS_CA",
        "CELLPLANE_TLS_CERT",
        "CELLPLANE_TLS_KEY",
    ] {
        assert!(env.contains(&needed), "{needed} missing from {env:?}");
    }
    assert_eq!(
        pod["volumes"][0]["secret"]["secretName"],
        "cellplane-operator-tls"
    );
    // The operator's arguments are ones it accepts: it gets past them to looking for its
    // API server.
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect();
    let dir = crate::scratch();
    let missing = dir.path().join("no-kubeconfig");
    let output = std::process::Command::new(cellplane_tests::binary("cellplane"))
        .args(&args)
        .arg("--kubeconfig")
        .arg(&missing)
        .env("POD_NAME", "cellplane-operator-0")
        .output()
        .expect("run cellplane operator");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("reading kubeconfig"),
        "{stderr}"
    );

    let monitor = named(&objects, "ServiceMonitor", "cellplane");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert!(of_kind(&rendered(&values_files()[0]), "ServiceMonitor").is_empty());
}

/// The two-region values with `value` at `pointer` (replaced or added), as a values file.
fn two_regions_with(dir: &std::path::Path, pointer: &str, value: Value) -> String {
    let text = std::fs::read_to_string(two_regions()).expect("read values");
    let mut values: Value = serde_saphyr::from_str(&text).expect("values YAML");
    let (parent, key) = pointer.rsplit_once('/').expect("a pointer");
    match values.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(key.to_string(), value);
        }
        Some(Value::Array(list)) => list[key.parse::<usize>().expect("index")] = value,
        _ => panic!("no {parent} in the values"),
    }
    let file = dir.join(format!("values-{}.json", pointer.replace('/', "_")));
    std::fs::write(&file, values.to_string()).expect("write values");
    file.display().to_string()
}

#[test]
fn bad_values_are_refused_naming_the_value_and_the_rule() {
    let dir = crate::scratch();
    let cases: [(&str, Value, &str); 9] = [
        ("/controlPlane/replicas", 4.into(), "/controlPlane/replicas"),
        ("/logFormat", "xml".into(), "/logFormat"),
        (
            "/controlPlane/raft",
            serde_json::json!({"heartbeat_ms": 5}),
            "heartbeat_ms",
        ),
        (
            "/regions/0/cells/0/tier",
            "GOLD".into(),
            "/regions/0/cells/0/tier",
        ),
        (
            "/regions/1/cells/0/id",
            "hz-a-high-1".into(),
            "cell id hz-a-high-1 is used twice",
        ),
        (
            "/regions/0/cells/1/port",
            7100.into(),
            "port 7100 is used by two cells",
        ),
        (
            "/regions/0/cells/1/zone",
            "hz-a".into(),
            "a standby must be in another zone",
        ),
        (
            "/regions/1/cells/0/standbyOf",
            "gone-1".into(),
            "which no region lists",
        ),
        ("/auth/admin", serde_json::json!([]), "auth.admin must list"),
    ];
    for (pointer, value, why) in cases {
        let file = two_regions_with(dir.path(), pointer, value);
        match render("cellplane", NAMESPACE, &["-f", &file]) {
            Ok(_) => panic!("{pointer} rendered"),
            Err(error) => assert!(error.contains(why), "{pointer}: {error}"),
        }
    }
    // Without a control plane of its own the chart needs the address of one.
    let error = render(
        "cellplane",
        NAMESPACE,
        &["--set", "controlPlane.enabled=false"],
    )
    .expect_err("no control plane");
    assert!(error.contains("controlPlane.externalEndpoints"), "{error}");
    let objects = rendered(&[
        "--set".into(),
        "controlPlane.enabled=false".into(),
        "--set".into(),
        "controlPlane.externalEndpoints={cp-1:7001,cp-2:7001}".into(),
    ]);
    assert!(of_kind(&objects, "StatefulSet").is_empty());
    let agent = named(&objects, "Deployment", "cellplane-agent-cn-hangzhou");
    assert!(
        agent["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args")
            .contains(&Value::from("--control-plane=cp-1:7001,cp-2:7001"))
    );
}

// kubectl runs to completion on this thread while the server's recording front serves it
// from the runtime's workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crds_the_chart_installs_apply_to_a_real_api_server() {
    let server = KubeApiServer::start().await;
    let kubeconfig = server.kubeconfig();
    let kubeconfig = kubeconfig.to_str().expect("path");
    let dir = crate::scratch();
    let output = run(&helm(), &["show", "crds", chart().to_str().expect("path")]);
    assert!(output.status.success());
    let crds = dir.path().join("crds.yaml");
    std::fs::write(&crds, &output.stdout).expect("write CRDs");
    let crds = crds.to_str().expect("path");

    let apply = run(
        &kubectl(),
        &[
            "--kubeconfig",
            kubeconfig,
            "apply",
            "--server-side",
            "-f",
            crds,
        ],
    );
    assert!(
        apply.status.success(),
        "{}",
        String::from_utf8_lossy(&apply.stderr)
    );
    let wait = run(
        &kubectl(),
        &[
            "--kubeconfig",
            kubeconfig,
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "-f",
            crds,
        ],
    );
    let established = String::from_utf8_lossy(&wait.stdout);
    assert!(wait.status.success(), "{established}");
    assert_eq!(established.matches("condition met").count(), 4);

    // A Tenant through kubectl, as a platform team would write it.
    let tenant = dir.path().join("tenant.yaml");
    std::fs::write(
        &tenant,
        "apiVersion: cellplane.io/v1alpha1\nkind: Tenant\nmetadata: {name: acme}\nspec: {tier: HIGH, homeRegion: cn-hangzhou}\n",
    )
    .expect("write tenant");
    // This server publishes no OpenAPI document for CRD groups (a cluster's aggregator does),
    // which kubectl's own check downloads; the server still checks every object itself.
    let apply = |file: &std::path::Path| {
        run(
            &kubectl(),
            &[
                "--kubeconfig",
                kubeconfig,
                "apply",
                "--server-side",
                "--validate=false",
                "-f",
                file.to_str().expect("path"),
            ],
        )
    };
    let create = apply(&tenant);
    assert!(
        create.status.success(),
        "{}",
        String::from_utf8_lossy(&create.stderr)
    );
    // kubectl shows the rule a bad object breaks.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: cellplane.io/v1alpha1\nkind: Tenant\nmetadata: {name: beta}\nspec: {tier: GOLD, homeRegion: cn-hangzhou}\n",
    )
    .expect("write tenant");
    let refused = apply(&bad);
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && error.contains("spec.tier") && error.contains("GOLD"),
        "{error}"
    );
    let get = run(
        &kubectl(),
        &["--kubeconfig", kubeconfig, "get", "tenants", "-o", "name"],
    );
    assert_eq!(
        String::from_utf8_lossy(&get.stdout).trim(),
        "tenant.cellplane.io/acme"
    );
}

/// Asserts that every call made through `server`'s kubeconfig (an operator's, run with
/// `--namespace` [`NAMESPACE`]) is one the chart's RBAC lets the operator's service account
/// make; answers the calls as RBAC sees them.
pub fn assert_the_chart_allows_every_call(server: &KubeApiServer) -> BTreeSet<Attributes> {
    let objects = rendered(&[]);
    let held = grants(&objects, "cellplane-operator", NAMESPACE);
    assert!(!held.is_empty(), "no role bound to the operator's account");
    let made: BTreeSet<Attributes> = server.calls().iter().filter_map(attributes).collect();
    assert!(!made.is_empty(), "no call recorded");
    let refused: Vec<&Attributes> = made
        .iter()
        .filter(|call| !held.iter().any(|grant| allows(grant, call)))
        .collect();
    assert!(
        refused.is_empty(),
        "the chart's RBAC refuses calls the operator made: {refused:#?}"
    );
    made
}
