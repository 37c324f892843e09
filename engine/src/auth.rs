//! Who a request is: with authentication off, the tenant a request names
//! (`X-Scope-OrgID`, as behind Pyroscope's own auth proxy); with it on, the
//! tenant its credentials map to, from a file of tokens and users. One
//! authenticator serves HTTP and Flight SQL.

use std::collections::HashMap;
use std::sync::RwLock;

use base64::Engine;
use serde::Deserialize;

use crate::tenant::{InvalidTenant, TenantId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No credentials, or unknown ones: 401 / Unauthenticated.
    Unauthenticated(String),
    /// Valid credentials that do not allow what the request asks: 403.
    Forbidden(String),
    /// A malformed tenant id: 400.
    InvalidTenant(InvalidTenant),
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Unauthenticated(m) | AuthError::Forbidden(m) => f.write_str(m),
            AuthError::InvalidTenant(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for AuthError {}

/// The auth file: `{"tokens": [{"token": "...", "tenant": "acme"}],
/// "users": [{"username": "u", "password": "p", "tenant": "acme"}]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
    #[serde(default)]
    users: Vec<UserEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    token: String,
    tenant: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    username: String,
    password: String,
    tenant: String,
}

#[derive(Debug, Default)]
pub struct Authenticator {
    /// None: authentication is off.
    config: Option<Credentials>,
    /// Bearer tokens handed out by the Flight basic-auth handshake.
    sessions: RwLock<HashMap<String, TenantId>>,
}

#[derive(Debug)]
struct Credentials {
    tokens: HashMap<String, TenantId>,
    users: HashMap<String, (String, TenantId)>,
}

/// Compares secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Authenticator {
    /// Authentication off: the tenant is whatever the request names.
    pub fn open() -> Self {
        Self::default()
    }

    pub fn from_json(json: &str) -> Result<Self, String> {
        let file: AuthFile = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let tenant = |t: &str| TenantId::parse(Some(t)).map_err(|e| e.to_string());
        let mut tokens = HashMap::new();
        for t in file.tokens {
            if t.token.len() < 16 {
                return Err(format!(
                    "a token of tenant {} is shorter than 16 characters",
                    t.tenant
                ));
            }
            tokens.insert(t.token, tenant(&t.tenant)?);
        }
        let mut users = HashMap::new();
        for u in file.users {
            users.insert(u.username, (u.password, tenant(&u.tenant)?));
        }
        Ok(Self {
            config: Some(Credentials { tokens, users }),
            sessions: RwLock::new(HashMap::new()),
        })
    }

    pub fn enabled(&self) -> bool {
        self.config.is_some()
    }

    /// The tenant of a request, from its `Authorization` header (a bearer
    /// token, or HTTP basic auth as agents send it) and the tenant it names.
    /// With authentication on, naming another tenant than the credentials'
    /// is refused.
    pub fn tenant(
        &self,
        authorization: Option<&str>,
        named: Option<&str>,
    ) -> Result<TenantId, AuthError> {
        let Some(creds) = &self.config else {
            return TenantId::parse(named).map_err(AuthError::InvalidTenant);
        };
        let value = authorization.map(str::trim).unwrap_or_default();
        let tenant = if let Some(token) = strip_scheme(value, "bearer ") {
            self.bearer(creds, token.trim())?
        } else if let Some(encoded) = strip_scheme(value, "basic ") {
            let (user, password) = basic_credentials(encoded)?;
            self.user(creds, &user, &password)?
        } else {
            return Err(AuthError::Unauthenticated(
                "authentication required: send Authorization: Bearer <token> or basic auth".into(),
            ));
        };
        match named.map(str::trim).filter(|n| !n.is_empty()) {
            Some(n) if n != tenant.as_str() => Err(AuthError::Forbidden(format!(
                "these credentials are for another tenant than {n:?}"
            ))),
            _ => Ok(tenant),
        }
    }

    fn bearer(&self, creds: &Credentials, token: &str) -> Result<TenantId, AuthError> {
        if let Some((_, t)) = creds.tokens.iter().find(|(k, _)| same_secret(k, token)) {
            return Ok(t.clone());
        }
        let sessions = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        sessions
            .iter()
            .find(|(k, _)| same_secret(k, token))
            .map(|(_, t)| t.clone())
            .ok_or_else(|| AuthError::Unauthenticated("unknown bearer token".into()))
    }

    fn user(&self, creds: &Credentials, user: &str, password: &str) -> Result<TenantId, AuthError> {
        match creds.users.get(user) {
            Some((p, t)) if same_secret(p, password) => Ok(t.clone()),
            _ => Err(AuthError::Unauthenticated(
                "unknown user or wrong password".into(),
            )),
        }
    }

    /// The Flight basic-auth handshake: checks the user and answers with a
    /// bearer token for later calls. With authentication off, any user gets
    /// a token that names no tenant (calls then use `x-scope-orgid`).
    pub fn handshake(&self, authorization: Option<&str>) -> Result<String, AuthError> {
        let Some(creds) = &self.config else {
            return Ok(random_token());
        };
        let encoded = authorization
            .map(str::trim)
            .and_then(|v| strip_scheme(v, "basic "))
            .ok_or_else(|| AuthError::Unauthenticated("handshake needs basic auth".into()))?;
        let (user, password) = basic_credentials(encoded)?;
        let tenant = self.user(creds, &user, &password)?;
        let token = random_token();
        let mut sessions = self.sessions.write().unwrap_or_else(|e| e.into_inner());
        // Bounded: a client that handshakes in a loop replaces old sessions.
        if sessions.len() >= 100_000 {
            sessions.clear();
        }
        sessions.insert(token.clone(), tenant);
        Ok(token)
    }
}

/// The rest of an `Authorization` value after its scheme, any case.
fn strip_scheme<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let head = value.get(..scheme.len())?;
    let rest = value.get(scheme.len()..)?;
    (head.eq_ignore_ascii_case(scheme) && !rest.is_empty()).then_some(rest)
}

fn basic_credentials(encoded: &str) -> Result<(String, String), AuthError> {
    let bad = || AuthError::Unauthenticated("malformed basic auth".into());
    // Go's Flight client (Grafana's, ADBC's) sends it unpadded.
    let encoded = encoded.trim();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded))
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (u, p) = text.split_once(':').ok_or_else(bad)?;
    Ok((u.to_string(), p.to_string()))
}

/// 32 random hex characters from the OS's randomness (through std's
/// randomly seeded hasher, which needs no extra dependency).
fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::with_capacity(32);
    for i in 0..2u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"{"tokens": [{"token": "tok-aaaaaaaaaaaaaaaa", "tenant": "team-a"}],
                           "users": [{"username": "bob", "password": "pw", "tenant": "team-b"}]}"#;

    fn basic(u: &str, p: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    }

    #[test]
    fn off_takes_the_named_tenant() {
        let a = Authenticator::open();
        assert_eq!(a.tenant(None, Some("x")).unwrap().as_str(), "x");
        assert_eq!(
            a.tenant(Some("Bearer whatever"), None).unwrap().as_str(),
            "anonymous"
        );
        assert!(matches!(
            a.tenant(None, Some("../x")),
            Err(AuthError::InvalidTenant(_))
        ));
    }

    #[test]
    fn on_maps_credentials_to_tenants_and_refuses_the_rest() {
        let a = Authenticator::from_json(FILE).unwrap();
        let t = |auth: Option<&str>, named: Option<&str>| a.tenant(auth, named);
        assert_eq!(
            t(Some("Bearer tok-aaaaaaaaaaaaaaaa"), None)
                .unwrap()
                .as_str(),
            "team-a"
        );
        assert_eq!(
            t(Some("bearer tok-aaaaaaaaaaaaaaaa"), Some("team-a"))
                .unwrap()
                .as_str(),
            "team-a"
        );
        assert_eq!(
            t(Some(&basic("bob", "pw")), None).unwrap().as_str(),
            "team-b"
        );
        assert!(matches!(
            t(None, Some("team-a")),
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(matches!(
            t(Some("Bearer nope"), None),
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(matches!(
            t(Some(&basic("bob", "no")), None),
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(matches!(
            t(Some("Basic !!!"), None),
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(matches!(
            t(Some("Bearer tok-aaaaaaaaaaaaaaaa"), Some("team-b")),
            Err(AuthError::Forbidden(_))
        ));
        let unpadded = base64::engine::general_purpose::STANDARD_NO_PAD.encode("bob:pw");
        assert_eq!(
            t(Some(&format!("Basic {unpadded}")), None)
                .unwrap()
                .as_str(),
            "team-b"
        );
        let token = a.handshake(Some(&basic("bob", "pw"))).unwrap();
        assert_eq!(
            t(Some(&format!("Bearer {token}")), None).unwrap().as_str(),
            "team-b"
        );
        assert!(a.handshake(Some(&basic("bob", "x"))).is_err());
        assert!(a.handshake(None).is_err());
        assert_ne!(a.handshake(Some(&basic("bob", "pw"))).unwrap(), token);
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(
            Authenticator::from_json(r#"{"tokens": [{"token": "short", "tenant": "a"}]}"#).is_err()
        );
        assert!(Authenticator::from_json(
            r#"{"tokens": [{"token": "aaaaaaaaaaaaaaaaaaaa", "tenant": "../a"}]}"#
        )
        .is_err());
        assert!(Authenticator::from_json(r#"{"nope": []}"#).is_err());
    }
}
