//! Envoy matchers of PolarisMesh match strings, shared by routing and rate-limit rules.

use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, HeaderMatcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatcher, StringMatcher,
};
use envoy_types::pb::envoy::r#type::v3::Int64Range;

use crate::model::rules::routing::int_range;
use crate::model::{MatchString, MatchType};

pub(super) fn string_matcher(pattern: MatchPattern) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    }
}

/// A matcher of the (whole-value) regex `re`.
pub(super) fn regex(re: String) -> StringMatcher {
    string_matcher(MatchPattern::SafeRegex(RegexMatcher {
        regex: re,
        ..Default::default()
    }))
}

/// `a|b|c` of the comma-separated values, escaped.
pub(super) fn alternatives(list: &str) -> String {
    list.split(',')
        .map(|v| regex::escape(v.trim()))
        .collect::<Vec<_>>()
        .join("|")
}

/// The regex of a match's values, to embed in a larger pattern (inversion is the caller's).
pub(super) fn pattern(m: &MatchString) -> String {
    match m.kind {
        MatchType::Exact | MatchType::NotEquals => regex::escape(&m.value),
        MatchType::In | MatchType::NotIn => format!("(?:{})", alternatives(&m.value)),
        _ => format!("(?:{})", m.value),
    }
}

/// A string match of `m`, and whether it is inverted (NOT_EQUALS, NOT_IN).
pub(super) fn string_match(m: &MatchString) -> (StringMatcher, bool) {
    match m.kind {
        MatchType::Exact => (string_matcher(MatchPattern::Exact(m.value.clone())), false),
        MatchType::NotEquals => (string_matcher(MatchPattern::Exact(m.value.clone())), true),
        MatchType::Regex => (regex(m.value.clone()), false),
        MatchType::In => (regex(alternatives(&m.value)), false),
        MatchType::NotIn => (regex(alternatives(&m.value)), true),
        // Refused by validation except on headers, which take a range match.
        MatchType::Range => (regex(".*".into()), false),
    }
}

/// A header matcher of `m` (RANGE: an integer range; NOT_EQUALS, NOT_IN: inverted, with a missing
/// header counted as not equal).
pub(super) fn header(name: &str, m: &MatchString) -> HeaderMatcher {
    let spec = match m.kind {
        MatchType::Range => {
            let (lo, hi) = int_range(&m.value).unwrap_or((0, 0));
            // Envoy's range is half open.
            HeaderMatchSpecifier::RangeMatch(Int64Range {
                start: lo,
                end: hi.saturating_add(1),
            })
        }
        _ => HeaderMatchSpecifier::StringMatch(string_match(m).0),
    };
    let invert = matches!(m.kind, MatchType::NotEquals | MatchType::NotIn);
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(spec),
        invert_match: invert,
        // A request without the header "is not equal" to the value.
        treat_missing_header_as_empty: invert,
    }
}
