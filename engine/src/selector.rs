//! Pyroscope / Prometheus label selectors: `{service_name="api", env=~"prod.*"}`.

use regex::Regex;
use thiserror::Error;

use crate::profile::Labels;

#[derive(Debug, Error, PartialEq)]
#[error("invalid label selector at byte {at}: {reason}")]
pub struct SelectorError {
    pub at: usize,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchOp {
    Equal,
    NotEqual,
    Regex,
    NotRegex,
}

#[derive(Debug, Clone)]
pub struct Matcher {
    pub name: String,
    pub op: MatchOp,
    pub value: String,
    regex: Option<Regex>,
}

impl Matcher {
    pub fn new(name: &str, op: MatchOp, value: &str) -> Result<Self, String> {
        let regex = match op {
            MatchOp::Regex | MatchOp::NotRegex => Some(
                Regex::new(&format!("^(?:{value})$"))
                    .map_err(|e| format!("bad regex {value:?}: {e}"))?,
            ),
            _ => None,
        };
        Ok(Self {
            name: name.to_string(),
            op,
            value: value.to_string(),
            regex,
        })
    }

    /// A missing label matches as the empty string, as in Prometheus.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let v = value.unwrap_or("");
        match (self.op, &self.regex) {
            (MatchOp::Equal, _) => v == self.value,
            (MatchOp::NotEqual, _) => v != self.value,
            (MatchOp::Regex, Some(r)) => r.is_match(v),
            (MatchOp::NotRegex, Some(r)) => !r.is_match(v),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Selector {
    pub matchers: Vec<Matcher>,
}

impl Selector {
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        Parser { text, pos: 0 }.selector()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.matchers.iter().all(|m| {
            let value = labels
                .iter()
                .find(|(k, _)| *k == m.name)
                .map(|(_, v)| v.as_str());
            m.matches(value)
        })
    }

    /// Whether a series printed in canonical form (`{a="1", b="2"}`, as the
    /// block metadata keeps it) matches.
    pub fn matches_series(&self, series: &str) -> bool {
        if self.matchers.is_empty() {
            return true;
        }
        match parse_series(series) {
            Some(labels) => self.matches(&labels),
            None => false,
        }
    }

    /// Whether a dataset of this service can hold matching series.
    pub fn may_match_service(&self, service: &str) -> bool {
        self.matchers
            .iter()
            .filter(|m| m.name == crate::profile::SERVICE_NAME)
            .all(|m| m.matches(Some(service)))
    }

    /// Services named exactly by an `=` matcher, for index pruning.
    pub fn exact_services(&self) -> Option<Vec<String>> {
        self.matchers
            .iter()
            .find(|m| m.name == crate::profile::SERVICE_NAME && m.op == MatchOp::Equal)
            .map(|m| vec![m.value.clone()])
    }
}

/// The labels of a series printed by [`crate::profile::labels_to_string`].
pub fn parse_series(series: &str) -> Option<Labels> {
    let selector = Selector::parse(series).ok()?;
    selector
        .matchers
        .into_iter()
        .map(|m| (m.op == MatchOp::Equal).then_some((m.name, m.value)))
        .collect()
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, reason: impl Into<String>) -> SelectorError {
        SelectorError {
            at: self.pos,
            reason: reason.into(),
        }
    }

    fn rest(&self) -> &str {
        &self.text[self.pos..]
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.text.len() - trimmed.len();
    }

    fn eat(&mut self, s: &str) -> bool {
        self.skip_ws();
        if self.rest().starts_with(s) {
            self.pos += s.len();
            true
        } else {
            false
        }
    }

    fn selector(mut self) -> Result<Selector, SelectorError> {
        self.skip_ws();
        if self.rest().is_empty() {
            return Ok(Selector::default());
        }
        if !self.eat("{") {
            return Err(self.err("expected '{'"));
        }
        let mut matchers = Vec::new();
        loop {
            if self.eat("}") {
                break;
            }
            let name = self.name()?;
            let op = self.op()?;
            let value = self.string()?;
            matchers.push(Matcher::new(&name, op, &value).map_err(|r| self.err(r))?);
            if self.eat(",") {
                continue;
            }
            if self.eat("}") {
                break;
            }
            return Err(self.err("expected ',' or '}'"));
        }
        self.skip_ws();
        if !self.rest().is_empty() {
            return Err(self.err("unexpected text after '}'"));
        }
        Ok(Selector { matchers })
    }

    fn name(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let len = self
            .rest()
            .char_indices()
            .find(|(i, c)| !(c.is_ascii_alphanumeric() || *c == '_' || (*i > 0 && *c == '.')))
            .map(|(i, _)| i)
            .unwrap_or(self.rest().len());
        if len == 0 || self.rest().starts_with(|c: char| c.is_ascii_digit()) {
            return Err(self.err("expected a label name"));
        }
        let name = self.rest()[..len].to_string();
        self.pos += len;
        Ok(name)
    }

    fn op(&mut self) -> Result<MatchOp, SelectorError> {
        for (s, op) in [
            ("=~", MatchOp::Regex),
            ("!~", MatchOp::NotRegex),
            ("!=", MatchOp::NotEqual),
            ("=", MatchOp::Equal),
        ] {
            if self.eat(s) {
                return Ok(op);
            }
        }
        Err(self.err("expected one of =, !=, =~, !~"))
    }

    fn string(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let quote = match self.rest().chars().next() {
            Some(q @ ('"' | '\'' | '`')) => q,
            _ => return Err(self.err("expected a quoted value")),
        };
        let mut out = String::new();
        let mut chars = self.rest().char_indices().skip(1);
        while let Some((i, c)) = chars.next() {
            match c {
                c if c == quote => {
                    self.pos += i + c.len_utf8();
                    return Ok(out);
                }
                '\\' if quote != '`' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, c)) => out.push(c),
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err(self.err("unterminated string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_and_matches_all_operators() {
        let s =
            Selector::parse(r#"{service_name="api", env=~"prod.*", region!="eu", host!~"x|y"}"#)
                .unwrap();
        assert_eq!(s.matchers.len(), 4);
        let l = labels(&[
            ("env", "prod-1"),
            ("host", "z"),
            ("region", "us"),
            ("service_name", "api"),
        ]);
        assert!(s.matches(&l));
        let l = labels(&[("env", "dev"), ("host", "z"), ("service_name", "api")]);
        assert!(!s.matches(&l));
        let l = labels(&[("env", "prod"), ("host", "x"), ("service_name", "api")]);
        assert!(!s.matches(&l));
        assert_eq!(s.exact_services(), Some(vec!["api".to_string()]));
        assert!(!s.may_match_service("db"));
    }

    #[test]
    fn regex_is_anchored_and_escapes_work() {
        let s = Selector::parse(r#"{a=~"pro", b="x\"y"}"#).unwrap();
        assert!(!s.matches(&labels(&[("a", "prod"), ("b", "x\"y")])));
        assert!(s.matches(&labels(&[("a", "pro"), ("b", "x\"y")])));
    }

    #[test]
    fn series_round_trip() {
        let labels = labels(&[("a", "x\"y"), ("service_name", "api")]);
        let printed = crate::profile::labels_to_string(&labels);
        assert_eq!(parse_series(&printed), Some(labels));
        let s = Selector::parse(r#"{a=~"x.*"}"#).unwrap();
        assert!(s.matches_series(&printed));
        assert!(!s.matches_series(r#"{a="z"}"#));
    }

    #[test]
    fn empty_selects_everything() {
        assert!(Selector::parse("{}")
            .unwrap()
            .matches(&labels(&[("a", "b")])));
        assert!(Selector::parse("  ").unwrap().matchers.is_empty());
    }

    #[test]
    fn errors_say_where() {
        for bad in [
            "service_name=\"a\"",
            "{a=}",
            "{a=\"x\"",
            "{a~\"x\"}",
            "{a=\"x\"} y",
            "{a=~\"(\"}",
            "{1a=\"x\"}",
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad} should fail");
        }
    }
}
