//! Tests against a real Kubernetes API server (`cellplane_tests::apiserver`): the CRDs as the
//! server takes them.

mod crds;
