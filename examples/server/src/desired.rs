//! Desired state: which config each agent should run, from the named configs (selector,
//! priority), the agent's own override, and the agent's attributes; templates rendered per
//! agent; drift. Pure functions: the control plane (`crate::control`) feeds them.

use std::collections::BTreeMap;

use bytes::Bytes;
use opamp::proto::AgentRemoteConfig;

use crate::db::{ConfigVersion, Override};
use crate::store::remote_config;

/// An agent's attributes, identifying and non-identifying, as strings (the identifying one
/// wins when both have a key).
pub(crate) type Attributes = BTreeMap<String, String>;

/// Whether every pair of `selector` equals one of `attrs` (an empty selector matches all).
pub(crate) fn matches(selector: &BTreeMap<String, String>, attrs: &Attributes) -> bool {
    selector.iter().all(|(k, v)| attrs.get(k) == Some(v))
}

/// One piece of a config body: text as it is, or an agent attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Attr {
        key: String,
        default: Option<String>,
    },
}

/// A config body with `${attr:KEY}` (or `${attr:KEY:-DEFAULT}`) variables; `$$` is a `$`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    pieces: Vec<Piece>,
}

/// Why a config body is not a valid template (a 400 at PUT time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TemplateError(pub(crate) String);

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Template {
    /// Parses `body`. Only UTF-8 bodies are templates; another body (binary) has no
    /// variables and is sent as it is. Every variable must be one that every agent the config
    /// can reach has: a key of `selector` (each matching agent has it), or one with a default.
    pub(crate) fn parse(
        body: &[u8],
        selector: &BTreeMap<String, String>,
    ) -> Result<Option<Template>, TemplateError> {
        let Ok(text) = std::str::from_utf8(body) else {
            return Ok(None);
        };
        if !text.contains('$') {
            return Ok(None);
        }
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(at) = rest.find('$') {
            literal.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            if let Some(r) = after.strip_prefix('$') {
                literal.push('$');
                rest = r;
            } else if let Some(r) = after.strip_prefix('{') {
                let end = r.find('}').ok_or_else(|| {
                    TemplateError(format!(
                        "unterminated variable at byte {}: `${{` without `}}` (write `$${{` for a literal `${{`)",
                        text.len() - rest.len() + at
                    ))
                })?;
                let var = &r[..end];
                let Some(spec) = var.strip_prefix("attr:") else {
                    return Err(TemplateError(format!(
                        "unknown variable ${{{var}}}: variables are ${{attr:KEY}} or \
                         ${{attr:KEY:-DEFAULT}} (write $${{ for a literal ${{)"
                    )));
                };
                let (key, default) = match spec.split_once(":-") {
                    Some((k, d)) => (k, Some(d.to_owned())),
                    None => (spec, None),
                };
                if key.is_empty() {
                    return Err(TemplateError(format!("empty attribute name in ${{{var}}}")));
                }
                if default.is_none() && !selector.contains_key(key) {
                    return Err(TemplateError(format!(
                        "unknown variable ${{attr:{key}}}: not every agent this config reaches \
                         has it; put {key} in the selector or give a default with \
                         ${{attr:{key}:-VALUE}}"
                    )));
                }
                if !literal.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut literal)));
                }
                pieces.push(Piece::Attr {
                    key: key.to_owned(),
                    default,
                });
                rest = &r[end + 1..];
            } else {
                literal.push('$');
                rest = after;
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        if pieces.iter().all(|p| matches!(p, Piece::Text(_))) && !text.contains("$$") {
            return Ok(None);
        }
        Ok(Some(Template { pieces }))
    }

    /// The body for an agent with `attrs` (a missing attribute takes its default; parse made
    /// sure one of the two exists for an agent the selector matches).
    pub(crate) fn render(&self, attrs: &Attributes) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Attr { key, default } => {
                    if let Some(v) = attrs.get(key).or(default.as_ref()) {
                        out.push_str(v);
                    }
                }
            }
        }
        out
    }
}

/// Where an agent's desired config comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// `PUT /api/v1/agents/{uid}/config`.
    Override,
    /// A named config, at a version.
    Named {
        name: String,
        version: i64,
        priority: i64,
    },
}

/// What one agent should run.
#[derive(Debug, Clone)]
pub(crate) struct Desired {
    pub(crate) source: Source,
    /// Other named configs whose selector matches too, outranked (by priority, then name).
    pub(crate) outranked: Vec<String>,
    pub(crate) remote_config: AgentRemoteConfig,
}

/// A named config ready to resolve: a version chosen per agent (see [`Candidate::version`]).
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    /// The version agents get.
    pub(crate) active: ConfigVersion,
    pub(crate) active_template: Option<Template>,
    pub(crate) active_config: AgentRemoteConfig,
    /// While a rollout is under way: the new version and the agents it was released to.
    pub(crate) rolling: Option<Rolling>,
}

#[derive(Debug, Clone)]
pub(crate) struct Rolling {
    pub(crate) version: ConfigVersion,
    pub(crate) template: Option<Template>,
    pub(crate) config: AgentRemoteConfig,
    pub(crate) released: std::collections::HashSet<String>,
}

impl Candidate {
    pub(crate) fn new(active: ConfigVersion) -> Self {
        let active_template = Template::parse(&active.body, &active.selector)
            .ok()
            .flatten();
        let active_config = remote_config(
            Bytes::from(active.body.clone()),
            active.content_type.clone(),
        );
        Self {
            active,
            active_template,
            active_config,
            rolling: None,
        }
    }

    fn selector(&self) -> &BTreeMap<String, String> {
        &self.active.selector
    }

    fn priority(&self) -> i64 {
        self.active.priority
    }

    /// The version, template and encoded config agent `uid` gets.
    fn version(&self, uid: &str) -> (&ConfigVersion, Option<&Template>, &AgentRemoteConfig) {
        match &self.rolling {
            Some(r) if r.released.contains(uid) => (&r.version, r.template.as_ref(), &r.config),
            _ => (
                &self.active,
                self.active_template.as_ref(),
                &self.active_config,
            ),
        }
    }
}

/// Orders candidates by priority (highest first), then name: the first that matches wins.
pub(crate) fn rank(candidates: &mut [Candidate]) {
    candidates.sort_by(|a, b| {
        b.priority()
            .cmp(&a.priority())
            .then_with(|| a.active.name.cmp(&b.active.name))
    });
}

/// The desired config of agent `uid` with `attrs`: its override, else the best-ranked named
/// config whose selector matches (`candidates` ranked by [`rank`]), rendered for it.
pub(crate) fn resolve(
    uid: &str,
    attrs: &Attributes,
    own: Option<&Override>,
    candidates: &[Candidate],
) -> Option<Desired> {
    let mut matching = candidates.iter().filter(|c| matches(c.selector(), attrs));
    let winner = if own.is_none() { matching.next() } else { None };
    let outranked: Vec<String> = matching.map(|c| c.active.name.clone()).collect();
    if let Some(o) = own {
        return Some(Desired {
            source: Source::Override,
            outranked,
            remote_config: remote_config(Bytes::from(o.body.clone()), o.content_type.clone()),
        });
    }
    let winner = winner?;
    let (version, template, config) = winner.version(uid);
    let remote_config = match template {
        Some(t) => remote_config(Bytes::from(t.render(attrs)), version.content_type.clone()),
        None => config.clone(),
    };
    Some(Desired {
        source: Source::Named {
            name: version.name.clone(),
            version: version.version,
            priority: version.priority,
        },
        outranked,
        remote_config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn version(name: &str, priority: i64, selector: &[(&str, &str)], body: &str) -> ConfigVersion {
        ConfigVersion {
            name: name.into(),
            version: 1,
            selector: sel(selector),
            priority,
            content_type: "text/yaml".into(),
            body: body.as_bytes().to_vec(),
            created_ms: 0,
            author: "t".into(),
        }
    }

    fn body(d: &Desired) -> String {
        let map = d.remote_config.config.as_ref().unwrap();
        String::from_utf8(map.config_map[""].body.to_vec()).unwrap()
    }

    #[test]
    fn every_selector_pair_must_match() {
        let attrs = sel(&[("environment", "prod"), ("region", "eu")]);
        assert!(matches(&sel(&[]), &attrs));
        assert!(matches(&sel(&[("environment", "prod")]), &attrs));
        assert!(matches(
            &sel(&[("environment", "prod"), ("region", "eu")]),
            &attrs
        ));
        assert!(!matches(
            &sel(&[("environment", "prod"), ("region", "us")]),
            &attrs
        ));
        assert!(!matches(&sel(&[("team", "x")]), &attrs));
    }

    #[test]
    fn priority_then_name_decides_overlaps_and_the_override_wins() {
        let attrs = sel(&[("environment", "prod")]);
        let mut c = vec![
            Candidate::new(version("all", 0, &[], "all")),
            Candidate::new(version("prod", 10, &[("environment", "prod")], "prod")),
            Candidate::new(version("b-same", 10, &[], "b")),
            Candidate::new(version("dev", 20, &[("environment", "dev")], "dev")),
        ];
        rank(&mut c);
        let d = resolve("u", &attrs, None, &c).unwrap();
        assert_eq!(body(&d), "b", "priority 10, and b-same < prod by name");
        assert_eq!(d.outranked, ["prod", "all"]);
        let own = Override {
            uid: "u".into(),
            content_type: "text/plain".into(),
            body: b"mine".to_vec(),
            updated_ms: 0,
        };
        let d = resolve("u", &attrs, Some(&own), &c).unwrap();
        assert_eq!(d.source, Source::Override);
        assert_eq!(body(&d), "mine");
        assert_eq!(d.outranked, ["b-same", "prod", "all"]);
        assert!(resolve("u", &sel(&[]), None, &c[..0]).is_none());
    }

    #[test]
    fn templates_render_per_agent_and_unknown_variables_are_refused() {
        let s = sel(&[("environment", "prod")]);
        let t = Template::parse(
            b"env: ${attr:environment}\nhost: ${attr:host.name:-unknown}\ncost: $$5 ${x\n"
                .as_slice(),
            &s,
        );
        // `${x` without a `}` is refused.
        assert!(t.unwrap_err().0.contains("unterminated"));
        let t = Template::parse(
            b"env: ${attr:environment}\nhost: ${attr:host.name:-unknown}\ncost: $$5 $HOME\n",
            &s,
        )
        .unwrap()
        .unwrap();
        let a = sel(&[("environment", "prod"), ("host.name", "h1")]);
        assert_eq!(t.render(&a), "env: prod\nhost: h1\ncost: $5 $HOME\n");
        assert_eq!(
            t.render(&sel(&[("environment", "prod")])),
            "env: prod\nhost: unknown\ncost: $5 $HOME\n"
        );
        let e = Template::parse(b"x: ${attr:region}", &s).unwrap_err();
        assert!(
            e.0.contains("${attr:region}") && e.0.contains("selector"),
            "{e}"
        );
        let e = Template::parse(b"x: ${env:HOME}", &s).unwrap_err();
        assert!(e.0.contains("unknown variable ${env:HOME}"), "{e}");
        // No variables: not a template; binary bodies neither.
        assert_eq!(Template::parse(b"plain: $5", &s), Ok(None));
        assert_eq!(Template::parse(&[0xff, b'$', b'{'], &s), Ok(None));
    }

    #[test]
    fn a_rollout_gives_the_new_version_to_released_agents_only() {
        let mut c = Candidate::new(version("base", 0, &[], "v1"));
        let mut v2 = version("base", 0, &[], "v2");
        v2.version = 2;
        c.rolling = Some(Rolling {
            config: remote_config(Bytes::from_static(b"v2"), "text/yaml".into()),
            template: None,
            version: v2,
            released: ["a".to_owned()].into(),
        });
        let c = [c];
        let a = resolve("a", &sel(&[]), None, &c).unwrap();
        let b = resolve("b", &sel(&[]), None, &c).unwrap();
        assert_eq!((body(&a), body(&b)), ("v2".into(), "v1".into()));
        assert!(matches!(a.source, Source::Named { version: 2, .. }));
    }
}
