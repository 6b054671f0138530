//! Id rules: every id in cellplane is 1–128 bytes of `[A-Za-z0-9._:-]`.
//!
//! The rule is checked at every edge (gRPC handlers, config, CRDs) with the name of the field,
//! so a bad id is refused with a message that says which field broke which rule.

use crate::limits::{MAX_ENDPOINT_BYTES, MAX_ID_BYTES};

/// Why a field was refused. `field` names the request field, so the caller can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct InvalidField {
    /// The request field, as named in the proto (`tenant_id`, `keys[3].conversation_id`).
    pub field: String,
    /// The rule that failed, in words.
    pub rule: String,
}

impl InvalidField {
    /// A refusal of `field` for breaking `rule`.
    pub fn new(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            rule: rule.into(),
        }
    }
}

/// A config field that breaks a rule: what every binary's config check answers, so a bad
/// config file or flag is refused at start naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field {field}: {rule}")]
pub struct ConfigError {
    pub field: String,
    pub rule: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            rule: rule.into(),
        }
    }
}

impl From<InvalidField> for ConfigError {
    fn from(err: InvalidField) -> Self {
        Self {
            field: err.field,
            rule: err.rule,
        }
    }
}

impl From<InvalidField> for tonic::Status {
    fn from(err: InvalidField) -> Self {
        tonic::Status::invalid_argument(err.to_string())
    }
}

fn allowed(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b':' | b'-')
}

/// Checks a required id.
pub fn validate_id(field: &str, value: &str) -> Result<(), InvalidField> {
    if value.is_empty() {
        return Err(InvalidField::new(field, "must not be empty"));
    }
    validate_id_chars(field, value)
}

/// Checks an id that may be empty (an absent conversation means "the tenant").
pub fn validate_optional_id(field: &str, value: &str) -> Result<(), InvalidField> {
    if value.is_empty() {
        return Ok(());
    }
    validate_id_chars(field, value)
}

fn validate_id_chars(field: &str, value: &str) -> Result<(), InvalidField> {
    if value.len() > MAX_ID_BYTES {
        return Err(InvalidField::new(
            field,
            format!("must be at most {MAX_ID_BYTES} bytes, got {}", value.len()),
        ));
    }
    if let Some(pos) = value.bytes().position(|b| !allowed(b)) {
        return Err(InvalidField::new(
            field,
            format!("may only contain [A-Za-z0-9._:-], found a disallowed character at byte {pos}"),
        ));
    }
    Ok(())
}

/// Checks a `host:port` endpoint a cell serves on.
pub fn validate_endpoint(field: &str, value: &str) -> Result<(), InvalidField> {
    if value.is_empty() {
        return Err(InvalidField::new(field, "must not be empty"));
    }
    if value.len() > MAX_ENDPOINT_BYTES {
        return Err(InvalidField::new(
            field,
            format!("must be at most {MAX_ENDPOINT_BYTES} bytes"),
        ));
    }
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(InvalidField::new(field, "must be host:port"));
    };
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(InvalidField::new(
            field,
            "must be host:port with a port in 1..=65535",
        ));
    }
    if value
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(InvalidField::new(field, "must not contain whitespace"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ids_at_the_limit() {
        assert!(validate_id("tenant_id", &"a".repeat(MAX_ID_BYTES)).is_ok());
        assert!(validate_id("tenant_id", "Acme.corp_1:eu-2").is_ok());
    }

    #[test]
    fn refuses_empty_long_and_bad_characters_naming_the_field() {
        let empty = validate_id("tenant_id", "").unwrap_err();
        assert_eq!(empty.field, "tenant_id");
        assert!(empty.to_string().contains("must not be empty"));

        let long = validate_id("cell_id", &"a".repeat(MAX_ID_BYTES + 1)).unwrap_err();
        assert_eq!(long.field, "cell_id");
        assert!(long.rule.contains("at most 128 bytes, got 129"));

        for bad in ["a b", "a/b", "ä", "a\0", "a*"] {
            let err = validate_id("conversation_id", bad).unwrap_err();
            assert!(err.rule.contains("[A-Za-z0-9._:-]"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn optional_ids_may_be_empty_but_not_bad() {
        assert!(validate_optional_id("conversation_id", "").is_ok());
        assert!(validate_optional_id("conversation_id", "x y").is_err());
    }

    #[test]
    fn endpoints_need_host_and_port() {
        assert!(validate_endpoint("endpoint", "127.0.0.1:7000").is_ok());
        assert!(validate_endpoint("endpoint", "cell-a.svc:443").is_ok());
        for bad in ["", "host", ":80", "host:0", "host:99999", "ho st:80"] {
            assert!(validate_endpoint("endpoint", bad).is_err(), "{bad:?}");
        }
    }
}
