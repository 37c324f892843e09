//! Ember's own query settings, carried in DataFusion's session config under
//! the `ember.` prefix (`information_schema.df_settings` lists them without
//! it, as DataFusion lists extension settings). A
//! statement cannot `SET` them (statements are refused); each front end takes
//! them from its request: Flight SQL from call headers, HTTP from headers.

use datafusion::catalog::Session;
use datafusion::common::extensions_options;
use datafusion::config::ConfigExtension;

extensions_options! {
    /// Settings of one query.
    pub struct Settings {
        /// Leave out level-0 blocks (segments not compacted yet): a
        /// dashboard that can trail by the compaction lag reads a handful of
        /// compacted blocks instead of every recent segment.
        pub skip_level0: bool, default = false
    }
}

impl ConfigExtension for Settings {
    const PREFIX: &'static str = "ember";
}

/// The request header (Flight SQL call metadata, HTTP) that sets
/// [`Settings::skip_level0`] with `true` or `false`.
pub const SKIP_LEVEL0_HEADER: &str = "x-ember-skip-level0";

impl Settings {
    /// The settings a query was planned with (defaults if none were given).
    pub fn of(state: &dyn Session) -> Settings {
        state
            .config_options()
            .extensions
            .get::<Settings>()
            .cloned()
            .unwrap_or_default()
    }

    /// Settings from a request's headers; `header(name)` returns a header's
    /// value if the request has it.
    pub fn from_headers<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Result<Settings, String> {
        let mut settings = Settings::default();
        if let Some(v) = header(SKIP_LEVEL0_HEADER) {
            settings.skip_level0 = match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                other => {
                    return Err(format!(
                        "{SKIP_LEVEL0_HEADER} must be true or false, not {other:?}"
                    ))
                }
            };
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_set_skip_level0_and_bad_values_are_refused() {
        let from = |v: Option<&'static str>| Settings::from_headers(move |_| v);
        assert!(!from(None).unwrap().skip_level0);
        assert!(from(Some("true")).unwrap().skip_level0);
        assert!(from(Some(" TRUE ")).unwrap().skip_level0);
        assert!(!from(Some("0")).unwrap().skip_level0);
        let err = from(Some("yes")).unwrap_err();
        assert!(err.contains(SKIP_LEVEL0_HEADER), "{err}");
    }
}
