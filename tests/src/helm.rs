//! The Helm chart (`helm/cellplane`) through real tools: helm 4 and kubectl
//! (`scripts/ensure-tools.sh helm`, or `$HELM_BIN` and `$KUBECTL_BIN`) and the Kubernetes API
//! schemas of `kubernetes-validate` (`scripts/ensure-tools.sh kubernetes-validate`, or
//! `$KUBERNETES_VALIDATE_BIN`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn tool(env: &str, relative: &str) -> PathBuf {
    std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/tools")
            .join(relative)
    })
}

pub fn helm() -> PathBuf {
    tool("HELM_BIN", "helm")
}

pub fn kubectl() -> PathBuf {
    tool("KUBECTL_BIN", "kubectl")
}

pub fn kubernetes_validate() -> PathBuf {
    tool(
        "KUBERNETES_VALIDATE_BIN",
        "kubernetes-validate/bin/kubernetes-validate",
    )
}

pub fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/cellplane")
}

/// Runs `program` with `args`, naming the install step when it is missing.
pub fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {} ({e}): ./scripts/ensure-tools.sh helm kubernetes-validate",
                program.display()
            )
        })
}

/// What `helm template` renders for release `release` in `namespace` with extra `args`
/// (`-f FILE`, `--set K=V`): every object, or helm's error text.
pub fn render(release: &str, namespace: &str, args: &[&str]) -> Result<Vec<Value>, String> {
    let chart = chart();
    let mut all = vec![
        "template",
        release,
        chart.to_str().expect("path"),
        "-n",
        namespace,
    ];
    all.extend_from_slice(args);
    let output = run(&helm(), &all);
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let text = String::from_utf8(output.stdout).expect("utf-8");
    let documents: Vec<Value> = serde_saphyr::from_multiple(&text).expect("rendered YAML");
    Ok(documents.into_iter().filter(|d| !d.is_null()).collect())
}

/// The objects of `kind` among `objects`.
pub fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// The object of `kind` named `name`.
pub fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}
