//! Kubernetes RBAC applied to recorded requests, as the API server's authorizer applies it: the
//! request's attributes (verb, group, resource, namespace, name) against the rules of the Roles
//! and ClusterRoles a service account is bound to. The test API server authorizes nothing, so
//! the chart's RBAC is checked against what the operator really asked of it.

use serde_json::Value;

use crate::apiserver::Call;

/// What RBAC decides on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// The attributes of a resource request; `None` for discovery and other non-resource paths,
/// which every authenticated caller may read in a cluster.
pub fn attributes(call: &Call) -> Option<Attributes> {
    let segments: Vec<&str> = call.path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, rest @ ..] if !rest.is_empty() => (Some(*namespace), rest),
        _ => (None, rest),
    };
    let (resource, name, subresource) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(*name), None),
        [resource, name, subresource] => (*resource, Some(*name), Some(*subresource)),
        _ => return None,
    };
    let watch = call
        .query
        .split('&')
        .any(|pair| pair == "watch=true" || pair == "watch=1");
    let verb = match (call.method.as_str(), name) {
        ("GET", Some(_)) => "get",
        ("GET", None) if watch => "watch",
        ("GET", None) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        _ => return None,
    };
    Some(Attributes {
        verb: verb.into(),
        group: group.into(),
        resource: match subresource {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.into(),
        },
        namespace: namespace.map(Into::into),
        // A create names no object in its path.
        name: if verb == "create" {
            None
        } else {
            name.map(Into::into)
        },
    })
}

/// One rule a service account holds: cluster-wide (a ClusterRoleBinding) or in a namespace.
#[derive(Debug, Clone)]
pub struct Grant {
    pub namespace: Option<String>,
    pub rule: Value,
}

/// The rules `objects` (rendered manifests of release namespace `release_namespace`) bind to
/// the service account `account` of that namespace.
pub fn grants(objects: &[Value], account: &str, release_namespace: &str) -> Vec<Grant> {
    let namespace_of = |o: &Value| {
        o["metadata"]["namespace"]
            .as_str()
            .unwrap_or(release_namespace)
            .to_string()
    };
    let binds = |binding: &Value| {
        binding["subjects"].as_array().is_some_and(|subjects| {
            subjects.iter().any(|s| {
                s["kind"] == "ServiceAccount"
                    && s["name"] == account
                    && s["namespace"] == release_namespace
            })
        })
    };
    let role = |kind: &str, name: &Value, namespace: Option<&str>| {
        objects.iter().find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"] == *name
                && namespace.is_none_or(|ns| namespace_of(o) == ns)
        })
    };
    let mut grants = Vec::new();
    for binding in objects.iter().filter(|o| binds(o)) {
        let reference = &binding["roleRef"];
        let (namespace, found) = match binding["kind"].as_str() {
            Some("ClusterRoleBinding") => (None, role("ClusterRole", &reference["name"], None)),
            Some("RoleBinding") => {
                let namespace = namespace_of(binding);
                let found = match reference["kind"].as_str() {
                    Some("ClusterRole") => role("ClusterRole", &reference["name"], None),
                    _ => role("Role", &reference["name"], Some(&namespace)),
                };
                (Some(namespace), found)
            }
            _ => continue,
        };
        let found = found.unwrap_or_else(|| panic!("{binding} binds a role not rendered"));
        for rule in found["rules"].as_array().into_iter().flatten() {
            grants.push(Grant {
                namespace: namespace.clone(),
                rule: rule.clone(),
            });
        }
    }
    grants
}

fn lists(rule: &Value, field: &str, value: &str) -> bool {
    rule[field]
        .as_array()
        .is_some_and(|items| items.iter().any(|i| i == value || i == "*"))
}

/// Whether `grant` lets a caller make a request of `attributes`.
pub fn allows(grant: &Grant, attributes: &Attributes) -> bool {
    let rule = &grant.rule;
    let in_scope = match &grant.namespace {
        None => true,
        Some(namespace) => attributes.namespace.as_ref() == Some(namespace),
    };
    let names = rule["resourceNames"].as_array().filter(|n| !n.is_empty());
    let named = match names {
        None => true,
        Some(names) => attributes
            .name
            .as_ref()
            .is_some_and(|name| names.iter().any(|n| n == name.as_str())),
    };
    in_scope
        && named
        && lists(rule, "apiGroups", &attributes.group)
        && lists(rule, "resources", &attributes.resource)
        && lists(rule, "verbs", &attributes.verb)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(method: &str, path: &str, query: &str) -> Attributes {
        attributes(&Call {
            method: method.into(),
            path: path.into(),
            query: query.into(),
        })
        .expect("a resource request")
    }

    #[test]
    fn requests_map_to_the_attributes_rbac_decides_on() {
        let watch = call(
            "GET",
            "/apis/cellplane.io/v1alpha1/tenants",
            "watch=true&resourceVersion=5",
        );
        assert_eq!(
            (watch.verb.as_str(), watch.group.as_str()),
            ("watch", "cellplane.io")
        );
        let status = call(
            "PATCH",
            "/apis/cellplane.io/v1alpha1/tenants/acme/status",
            "fieldManager=x",
        );
        assert_eq!(status.resource, "tenants/status");
        assert_eq!(status.name.as_deref(), Some("acme"));
        let lease = call(
            "POST",
            "/apis/coordination.k8s.io/v1/namespaces/ops/leases",
            "",
        );
        assert_eq!(lease.verb, "create");
        assert_eq!(lease.namespace.as_deref(), Some("ops"));
        assert!(
            attributes(&Call {
                method: "GET".into(),
                path: "/apis".into(),
                query: String::new()
            })
            .is_none()
        );
    }

    #[test]
    fn a_rule_allows_only_its_verbs_names_and_namespace() {
        let grant = Grant {
            namespace: Some("ops".into()),
            rule: serde_json::json!({
                "apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                "resourceNames": ["lock"], "verbs": ["get", "update"],
            }),
        };
        let get = call(
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/ops/leases/lock",
            "",
        );
        assert!(allows(&grant, &get));
        let other = call(
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/ops/leases/other",
            "",
        );
        assert!(!allows(&grant, &other));
        let elsewhere = call(
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/default/leases/lock",
            "",
        );
        assert!(!allows(&grant, &elsewhere));
        let create = call(
            "POST",
            "/apis/coordination.k8s.io/v1/namespaces/ops/leases",
            "",
        );
        assert!(
            !allows(&grant, &create),
            "resourceNames never match a create"
        );
    }
}
