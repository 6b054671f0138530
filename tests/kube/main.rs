//! Tests against a real Kubernetes API server (`cellplane_tests::apiserver`): the CRDs as the
//! server takes them, the operator reconciling them against a real control plane, and the Helm
//! chart through real helm, kubectl and the Kubernetes schemas.

mod chart;
mod crds;
mod operator;

/// A directory for a test's logs, kept when `CELLPLANE_KEEP_CLUSTER` is set.
fn scratch() -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new()
        .prefix("cellplane-operator-")
        .tempdir()
        .expect("temp dir");
    if std::env::var_os("CELLPLANE_KEEP_CLUSTER").is_some() {
        dir.disable_cleanup(true);
    }
    dir
}
