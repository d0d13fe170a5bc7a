//! Which configured rule a request descriptor gets: envoyproxy/ratelimit's lookup. At each
//! level of the tree, an exact `key_value` child wins over a `value: prefix*` child, which wins
//! over a value-less `key` child; the rule applies only when the request's entries end exactly
//! at a node that has one (a longer or shorter request descriptor gets no limit).

use crate::rls::config::{Node, RateLimitRule};

pub fn find<'a>(root: &'a Node, entries: &[(&str, &str)]) -> Option<&'a RateLimitRule> {
    find_match(root, entries).map(|m| m.rule)
}

/// A matched rule, with the entries whose value a `share_threshold` wildcard replaces in the
/// counter's key (index, pattern).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match<'a> {
    pub rule: &'a RateLimitRule,
    pub shared: Vec<(usize, &'a str)>,
}

pub fn find_match<'a>(root: &'a Node, entries: &[(&str, &str)]) -> Option<Match<'a>> {
    let mut node = root;
    let mut shared = Vec::new();
    for (i, (k, v)) in entries.iter().enumerate() {
        let exact = format!("{k}_{v}");
        let next = node
            .children
            .get(&exact)
            .or_else(|| {
                node.wildcards
                    .iter()
                    .find(|(prefix, _)| exact.starts_with(prefix.as_str()))
                    .map(|(_, n)| n)
            })
            .or_else(|| node.children.get(*k))?;
        if let Some(p) = &next.shared_value {
            shared.push((i, p.as_str()));
        }
        if i + 1 == entries.len() {
            return next.rule.as_ref().map(|rule| Match { rule, shared });
        }
        node = next;
    }
    None
}

/// Applies `replaces`: a matched rule named by another matched rule's `replaces` is dropped.
pub fn apply_replaces(rules: Vec<Option<&RateLimitRule>>) -> Vec<Option<&RateLimitRule>> {
    let replaced: Vec<&str> = rules
        .iter()
        .flatten()
        .flat_map(|r| r.replaces.iter().map(String::as_str))
        .collect();
    if replaced.is_empty() {
        return rules;
    }
    rules
        .into_iter()
        .map(|r| r.filter(|r| !r.name.as_deref().is_some_and(|n| replaced.contains(&n))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rls::config::{Limit, RlsConfig};

    const CONF: &str = r#"
domain: d
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 10}
  - key: database
    value: users
    rate_limit: {unit: second, requests_per_unit: 500}
  - key: database
    rate_limit: {unit: second, requests_per_unit: 100}
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit: {unit: day, requests_per_unit: 5}
  - key: to_number
    rate_limit: {unit: day, requests_per_unit: 100}
  - key: path
    value: /api/*
    rate_limit: {unit: minute, requests_per_unit: 7}
  - key: foo
    rate_limit: {unlimited: true}
  - key: shared
    value: ab*
    share_threshold: true
    rate_limit: {unit: minute, requests_per_unit: 9}
  - key: key1
    value: a
    rate_limit: {unit: minute, requests_per_unit: 3, name: small}
  - key: key2
    rate_limit: {unit: minute, requests_per_unit: 30, name: big, replaces: [{name: small}]}
"#;

    fn limit_of(node: &Node, entries: &[(&str, &str)]) -> Option<u64> {
        find(node, entries).map(|r| match &r.limit {
            Limit::Counted(c) => c.requests_per_unit,
            Limit::Unlimited => u64::MAX,
        })
    }

    #[test]
    fn most_specific_match_first() {
        let (_, n) = RlsConfig::parse_file(CONF).unwrap();
        assert_eq!(limit_of(&n, &[("database", "users")]), Some(500));
        assert_eq!(limit_of(&n, &[("database", "other")]), Some(100));
        assert_eq!(limit_of(&n, &[("remote_address", "10.0.0.1")]), Some(10));
        assert_eq!(
            limit_of(
                &n,
                &[("message_type", "marketing"), ("to_number", "2061234567")]
            ),
            Some(5)
        );
        assert_eq!(limit_of(&n, &[("to_number", "2061234567")]), Some(100));
        assert_eq!(limit_of(&n, &[("path", "/api/v1")]), Some(7));
        assert_eq!(limit_of(&n, &[("foo", "x")]), Some(u64::MAX));
        let m = find_match(&n, &[("shared", "abc")]).unwrap();
        assert_eq!(m.shared, vec![(0, "ab*")]);
        assert!(find_match(&n, &[("path", "/api/x")])
            .unwrap()
            .shared
            .is_empty());
    }

    #[test]
    fn depth_must_match_exactly_and_unknown_keys_get_nothing() {
        let (_, n) = RlsConfig::parse_file(CONF).unwrap();
        // Stops short of a rule: no limit.
        assert_eq!(limit_of(&n, &[("message_type", "marketing")]), None);
        // Longer than the tree: no limit.
        assert_eq!(limit_of(&n, &[("database", "users"), ("x", "y")]), None);
        assert_eq!(limit_of(&n, &[("message_type", "transactional")]), None);
        assert_eq!(limit_of(&n, &[("nope", "x")]), None);
        assert_eq!(limit_of(&n, &[]), None);
        assert_eq!(limit_of(&n, &[("path", "/other")]), None);
    }

    #[test]
    fn replaces_drops_the_named_rule_only_when_both_match() {
        let (_, n) = RlsConfig::parse_file(CONF).unwrap();
        let small = find(&n, &[("key1", "a")]);
        let big = find(&n, &[("key2", "b")]);
        let db = find(&n, &[("database", "x")]);
        let out = apply_replaces(vec![small, big, db]);
        assert!(out[0].is_none());
        assert_eq!(out[1], big);
        assert_eq!(out[2], db);
        assert_eq!(apply_replaces(vec![small])[0], small);
    }
}
