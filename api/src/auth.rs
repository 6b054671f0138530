//! Who may call what. Under mTLS a caller's identity is its client certificate's subject
//! common name; the `[auth]` table of a config gives identities roles, and every call is
//! checked against the role its method needs before it reaches a service:
//!
//! - `admin`: everything ops do (tenants, moves, migrations, failovers, drains, membership);
//! - `agent`: what cell agents do (registration, heartbeats, leases, reports; a cell's admin
//!   calls and its standbys' replication stream);
//! - `reader`: lookups, watches, gets and lists; and, on a cell, what IM front ends do
//!   (messaging, sync);
//! - `node`: a control-plane peer: Raft, and requests a follower already checked and forwards.
//!
//! An admin or an agent may also read. Health and reflection are open to any certificate of
//! the CA. A call outside the caller's roles is answered `PERMISSION_DENIED` naming the
//! identity and what the method needs, and reaches nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::tls::ConnInfo;
use tonic::Status;

/// A role an identity may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Agent,
    Reader,
    Node,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Agent => "agent",
            Self::Reader => "reader",
            Self::Node => "node",
        }
    }
}

/// The `[auth]` table: identities (certificate common names) by role.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub admin: Vec<String>,
    #[serde(default)]
    pub agent: Vec<String>,
    #[serde(default)]
    pub reader: Vec<String>,
    #[serde(default)]
    pub node: Vec<String>,
    /// The region each agent identity acts for: it may register, report and renew only that
    /// region's cells. An agent not listed here may act for any region.
    #[serde(default)]
    pub regions: BTreeMap<String, String>,
}

/// Who called, as the layer found it, for the services' own checks (an agent's region).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub identity: String,
    pub roles: BTreeSet<Role>,
    /// The region an agent identity acts for.
    pub region: Option<String>,
}

impl Caller {
    /// The region this caller is confined to: an agent's, unless it is also an admin or a
    /// node (a peer forwards requests it checked itself).
    pub fn confined_to(&self) -> Option<&str> {
        let free = self.roles.contains(&Role::Admin) || self.roles.contains(&Role::Node);
        if free { None } else { self.region.as_deref() }
    }
}

/// What a method needs: any one of these roles.
pub type Needs = &'static [Role];

/// The roles each method of a server needs, by its full path
/// (`/cellplane.control.v1.Control/CreateTenant`); `None` for methods open to any certificate.
pub type Rules = fn(&str) -> Option<Needs>;

/// Roles by identity, and the server's rules; or open, letting every call through.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Every identity with a role, as the services learn of it.
    callers: BTreeMap<String, Arc<Caller>>,
    rules: Rules,
    enforced: bool,
}

impl Policy {
    /// The policy of a server: enforced when it runs mTLS and its config has an `[auth]`
    /// table; open otherwise (plaintext has no identities; mTLS without `[auth]` lets any
    /// certificate of the CA call everything, which the server says when it starts).
    pub fn for_server(tls: bool, config: Option<&AuthConfig>, rules: Rules) -> Self {
        match config {
            Some(config) if tls => Self::new(config, rules),
            _ => Self {
                callers: BTreeMap::new(),
                rules,
                enforced: false,
            },
        }
    }

    pub fn is_enforced(&self) -> bool {
        self.enforced
    }

    pub fn new(config: &AuthConfig, rules: Rules) -> Self {
        let mut roles: BTreeMap<String, BTreeSet<Role>> = BTreeMap::new();
        for (role, names) in [
            (Role::Admin, &config.admin),
            (Role::Agent, &config.agent),
            (Role::Reader, &config.reader),
            (Role::Node, &config.node),
        ] {
            for name in names {
                roles.entry(name.clone()).or_default().insert(role);
            }
        }
        let callers = roles
            .into_iter()
            .map(|(identity, roles)| {
                let caller = Caller {
                    region: config.regions.get(&identity).cloned(),
                    identity: identity.clone(),
                    roles,
                };
                (identity, Arc::new(caller))
            })
            .collect();
        Self {
            callers,
            rules,
            enforced: true,
        }
    }

    /// Whether a call from `identity` may be one a peer forwards: from a node, or any call
    /// when the policy is open (plaintext has no identities to tell peers by).
    pub fn is_peer(&self, identity: Option<&str>) -> bool {
        !self.enforced
            || identity
                .and_then(|i| self.callers.get(i))
                .is_some_and(|c| c.roles.contains(&Role::Node))
    }

    /// What the services learn of an identity the policy let through.
    pub fn caller(&self, identity: &str) -> Option<Arc<Caller>> {
        self.callers.get(identity).cloned()
    }

    /// Whether `identity` may call `method`, or why not.
    pub fn check(&self, identity: Option<&str>, method: &str) -> Result<(), Status> {
        let Some(needs) = (self.rules)(method).filter(|_| self.enforced) else {
            return Ok(());
        };
        let Some(identity) = identity else {
            return Err(Status::unauthenticated(format!(
                "{method} needs a client certificate naming an identity (role {})",
                names(needs)
            )));
        };
        let held = self.callers.get(identity).map(|c| &c.roles);
        let allowed = held.is_some_and(|held| {
            held.contains(&Role::Node) || needs.iter().any(|need| held.contains(need))
        });
        if allowed {
            return Ok(());
        }
        let held = held
            .map(|h| h.iter().map(|r| r.name()).collect::<Vec<_>>().join(", "))
            .unwrap_or_else(|| "no role".into());
        Err(Status::permission_denied(format!(
            "{identity:?} ({held}) may not call {method}: it needs role {}",
            names(needs)
        )))
    }
}

fn names(needs: Needs) -> String {
    needs
        .iter()
        .map(|r| r.name())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// The identity of the caller of `request`: its client certificate's common name, as read
/// when the connection was made.
pub fn identity<B>(request: &http::Request<B>) -> Option<Arc<str>> {
    request.extensions().get::<ConnInfo>()?.identity.clone()
}

/// The address the caller of `request` connected from.
pub fn peer<B>(request: &http::Request<B>) -> Option<std::net::SocketAddr> {
    request.extensions().get::<ConnInfo>().map(|info| info.addr)
}

/// A tower layer that checks every call against `policy` before it reaches a service.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    policy: Arc<Policy>,
}

impl AuthLayer {
    pub fn new(policy: Policy) -> Self {
        Self::shared(Arc::new(policy))
    }

    /// A layer checking against a policy other layers also read.
    pub fn shared(policy: Arc<Policy>) -> Self {
        Self { policy }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authorized<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorized {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Authorized<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S, B> tower::Service<http::Request<B>> for Authorized<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures::future::Either<S::Future, std::future::Ready<Result<Self::Response, Self::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let open = !self.policy.enforced || (self.policy.rules)(request.uri().path()).is_none();
        if open {
            return futures::future::Either::Left(self.inner.call(request));
        }
        let identity = identity(&request);
        match self.policy.check(identity.as_deref(), request.uri().path()) {
            Ok(()) => {
                if let Some(caller) = identity.as_deref().and_then(|i| self.policy.caller(i)) {
                    request.extensions_mut().insert(caller);
                }
                futures::future::Either::Left(self.inner.call(request))
            }
            Err(status) => {
                tracing::warn!(
                    identity = identity.as_deref().unwrap_or("-"),
                    method = request.uri().path(),
                    "refused: {}",
                    status.message()
                );
                futures::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(method: &str) -> Option<Needs> {
        match method {
            "/x.Admin/Do" => Some(&[Role::Admin]),
            "/x.Read/Get" => Some(&[Role::Reader, Role::Admin, Role::Agent]),
            _ => None,
        }
    }

    fn policy() -> Policy {
        Policy::new(
            &AuthConfig {
                admin: vec!["ops".into()],
                agent: vec!["agent-hz".into()],
                reader: vec!["frontend".into()],
                node: vec!["peer".into()],
                regions: [("agent-hz".to_string(), "hz".to_string())].into(),
            },
            rules,
        )
    }

    #[test]
    fn an_agent_is_confined_to_its_region_and_admins_and_peers_are_not() {
        let p = policy();
        let agent = p.caller("agent-hz").expect("known");
        assert_eq!(agent.confined_to(), Some("hz"));
        assert_eq!(p.caller("ops").expect("known").confined_to(), None);
        assert_eq!(p.caller("peer").expect("known").confined_to(), None);
        assert_eq!(p.caller("who"), None);
    }

    #[test]
    fn each_role_reaches_its_methods_and_no_other() {
        let p = policy();
        assert!(p.check(Some("ops"), "/x.Admin/Do").is_ok());
        assert!(
            p.check(Some("peer"), "/x.Admin/Do").is_ok(),
            "a peer forwards"
        );
        assert!(p.check(Some("frontend"), "/x.Read/Get").is_ok());
        assert!(p.check(Some("agent-hz"), "/x.Read/Get").is_ok());
        assert!(p.check(None, "/grpc.health.v1.Health/Check").is_ok());
        let denied = p.check(Some("agent-hz"), "/x.Admin/Do").expect_err("agent");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            denied.message().contains("\"agent-hz\" (agent)"),
            "{denied:?}"
        );
        assert!(denied.message().contains("needs role admin"), "{denied:?}");
        let stranger = p.check(Some("who"), "/x.Read/Get").expect_err("stranger");
        assert!(stranger.message().contains("no role"), "{stranger:?}");
        let anonymous = p.check(None, "/x.Read/Get").expect_err("anonymous");
        assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn plaintext_or_no_auth_table_lets_everything_through() {
        let config = AuthConfig::default();
        for open in [
            Policy::for_server(false, Some(&config), rules),
            Policy::for_server(true, None, rules),
        ] {
            assert!(!open.is_enforced());
            assert!(open.check(None, "/x.Admin/Do").is_ok());
        }
        assert!(Policy::for_server(true, Some(&config), rules).is_enforced());
    }
}
