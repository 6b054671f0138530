//! Limits shared by every component, named once so each is enforced and tested at the edge.

/// Longest id (tenant, conversation, cell, region, zone), in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// Longest cell endpoint, in bytes.
pub const MAX_ENDPOINT_BYTES: usize = 256;

/// Most keys one `BatchLookup` may ask for.
pub const MAX_BATCH_KEYS: usize = 10_000;

/// Largest page of `ListRoutes` / `ListTenants`.
pub const MAX_PAGE_SIZE: u32 = 10_000;

/// Page size when a request leaves it at 0.
pub const DEFAULT_PAGE_SIZE: u32 = 1_000;

/// Largest request message a server decodes by default (tonic's own default, named here so
/// every server states it).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Most streams one HTTP/2 connection may have open at once by default: each call is a
/// stream, so this bounds what one client connection can hold of a server.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1_024;

/// Applies `name=value` overrides (`--limit max_watches=100`) to a `[limits]` table: each name
/// must be one of its fields and each value of that field's type, or the field is named in the
/// error.
pub fn with_overrides<T>(limits: &T, overrides: &[String]) -> Result<T, crate::ids::ConfigError>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    use crate::ids::ConfigError;
    let mut table =
        serde_json::to_value(limits).map_err(|e| ConfigError::new("limits", e.to_string()))?;
    let fields = table
        .as_object_mut()
        .ok_or_else(|| ConfigError::new("limits", "must be a table"))?;
    for pair in overrides {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| ConfigError::new("--limit", format!("{pair:?} is not name=value")))?;
        let field = format!("limits.{name}");
        let current = fields
            .get(name)
            .ok_or_else(|| ConfigError::new(&field, "no such limit"))?;
        let parsed = match current {
            serde_json::Value::Bool(_) => value.parse::<bool>().map(serde_json::Value::from).ok(),
            serde_json::Value::Number(_) => value.parse::<u64>().map(serde_json::Value::from).ok(),
            _ => Some(serde_json::Value::from(value)),
        }
        .ok_or_else(|| ConfigError::new(&field, format!("{value:?} is not a whole number")))?;
        fields.insert(name.to_string(), parsed);
    }
    serde_json::from_value(table).map_err(|e| ConfigError::new("limits", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        max_things: u32,
        max_bytes: usize,
    }

    #[test]
    fn overrides_name_a_limit_and_a_number_or_are_refused_naming_it() {
        let base = Sample {
            max_things: 1,
            max_bytes: 2,
        };
        let changed = with_overrides(&base, &["max_bytes=4096".into()]).expect("override");
        assert_eq!(
            changed,
            Sample {
                max_things: 1,
                max_bytes: 4096
            }
        );
        for (bad, field) in [
            ("max_thingz=3", "limits.max_thingz"),
            ("max_things=many", "limits.max_things"),
            ("max_things", "--limit"),
            ("max_things=99999999999", "limits"),
        ] {
            let err = with_overrides(&base, &[bad.into()]).expect_err(bad);
            assert_eq!(err.field, field, "{bad}: {err}");
        }
    }
}
