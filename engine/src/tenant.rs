//! Tenant ids: one rule for every surface (HTTP push and ingest, Flight SQL,
//! SQL sessions, object paths), so that an id accepted on the way in is
//! always accepted on the way out.

use std::fmt;

/// The tenant of requests that name none, as in Pyroscope.
pub const DEFAULT_TENANT: &str = "anonymous";

/// Longest tenant id, as Cortex/Pyroscope allow.
pub const MAX_TENANT_LEN: usize = 150;

/// A tenant id that passed [`TenantId::parse`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTenant(pub String);

impl fmt::Display for InvalidTenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid tenant id {:?}: use at most {MAX_TENANT_LEN} of a-z A-Z 0-9 ! - _ . * ' ( ), not \".\" or \"..\"",
            self.0
        )
    }
}

impl std::error::Error for InvalidTenant {}

impl TenantId {
    /// Pyroscope's rule (Cortex's `ValidateTenantID`): printable, short, and
    /// never a path component that escapes its directory. `None` or a blank
    /// id is the default tenant.
    pub fn parse(id: Option<&str>) -> Result<Self, InvalidTenant> {
        let Some(t) = id.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(Self(DEFAULT_TENANT.to_string()));
        };
        let ok = t.len() <= MAX_TENANT_LEN
            && t != "."
            && t != ".."
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "!-_.*'()".contains(c));
        if ok {
            Ok(Self(t.to_string()))
        } else {
            Err(InvalidTenant(t.chars().take(200).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for TenantId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pyroscope_rule() {
        assert_eq!(TenantId::parse(None).unwrap().as_str(), DEFAULT_TENANT);
        assert_eq!(
            TenantId::parse(Some("  ")).unwrap().as_str(),
            DEFAULT_TENANT
        );
        for ok in ["team-a", "acme.prod", "a_b", "x*y", "it's(1)!"] {
            assert_eq!(TenantId::parse(Some(ok)).unwrap().as_str(), ok);
        }
        for bad in ["..", ".", "a/b", "../etc", "a b", "é", "a\"b", "a;b"] {
            assert!(TenantId::parse(Some(bad)).is_err(), "{bad}");
        }
        assert!(TenantId::parse(Some(&"a".repeat(151))).is_err());
        assert!(TenantId::parse(Some(&"a".repeat(150))).is_ok());
    }
}
