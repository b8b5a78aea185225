//! Routing: host + longest path prefix → deployment; first matching rule → route.

use http::Method;

use crate::config::{Config, Deployment, Route};
use crate::text;

/// The outcome of routing a request.
#[derive(Debug, Clone, Copy)]
pub struct RouteMatch<'a> {
    /// Position of the deployment in the config.
    pub index: usize,
    /// The deployment.
    pub deployment: &'a Deployment,
    /// The first matching route rule, if any.
    pub route: Option<&'a Route>,
    /// Its position in the deployment's rules.
    pub route_index: Option<usize>,
}

impl RouteMatch<'_> {
    /// The operation name for usage: the route's name, else the method.
    pub fn operation<'m>(&'m self, method: &'m Method) -> &'m str {
        self.route.map_or(method.as_str(), |r| r.name.as_str())
    }
}

/// True when `path` is `prefix` or continues it at a segment boundary.
pub fn segment_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match text::strip_prefix(path, prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The part of `path` after a deployment's prefix (always starts with '/').
pub fn strip_segment_prefix<'p>(path: &'p str, prefix: &str) -> &'p str {
    if prefix == "/" {
        return path;
    }
    match text::strip_prefix(path, prefix) {
        Some("") | None => "/",
        Some(rest) => rest,
    }
}

fn host_matches(patterns: &[String], host: &str) -> bool {
    patterns.iter().any(|p| match p.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => p.eq_ignore_ascii_case(host),
    })
}

/// Strips the port from a Host value (handles `[v6]:port`).
pub fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    })
}

/// Routes a request. Deployments that name the host win over catch-all ones; among those,
/// the longest path prefix wins.
pub fn route<'a>(
    cfg: &'a Config,
    host: Option<&str>,
    path: &str,
    method: &Method,
) -> Option<RouteMatch<'a>> {
    let host = host.map(host_without_port);
    let mut best: Option<(bool, usize, usize)> = None;
    for (i, d) in cfg.deployments.iter().enumerate() {
        let specific = !d.hosts.is_empty();
        if specific && !host.is_some_and(|h| host_matches(&d.hosts, h)) {
            continue;
        }
        if !segment_prefix(path, &d.path_prefix) {
            continue;
        }
        let rank = (specific, d.path_prefix.len(), i);
        if best.is_none_or(|(bs, bl, _)| (specific, d.path_prefix.len()) > (bs, bl)) {
            best = Some(rank);
        }
    }
    let (_, _, index) = best?;
    let deployment = &cfg.deployments[index];
    let rest = strip_segment_prefix(path, &deployment.path_prefix);
    let route_index = deployment.routes.iter().position(|r| {
        (r.methods.is_empty() || r.methods.contains(method)) && segment_prefix(rest, &r.path)
    });
    let route = route_index.map(|i| &deployment.routes[i]);
    Some(RouteMatch {
        index,
        deployment,
        route,
        route_index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg() -> Config {
        Config::parse(
            Path::new("t.toml"),
            r#"
[[deployments]]
name = "root"
upstream = "echo"
[[deployments]]
name = "app"
upstream = "echo"
path_prefix = "/my-app"
  [[deployments.routes]]
  name = "create"
  methods = ["POST"]
  path = "/scenarios"
  scope = "create_scenarios"
  [[deployments.routes]]
  name = "any"
  path = "/"
[[deployments]]
name = "api-host"
upstream = "echo"
hosts = ["api.example.com", "*.corp.example"]
"#,
        )
        .unwrap()
    }

    #[test]
    fn longest_prefix_on_segments() {
        let c = cfg();
        let m = route(&c, None, "/my-app/scenarios/1", &Method::POST).unwrap();
        assert_eq!(m.deployment.name, "app");
        assert_eq!(m.route.unwrap().name, "create");
        let m = route(&c, None, "/my-app/scenariosX", &Method::POST).unwrap();
        assert_eq!(m.route.unwrap().name, "any");
        assert_eq!(
            route(&c, None, "/my-appx", &Method::GET)
                .unwrap()
                .deployment
                .name,
            "root"
        );
        let m = route(&c, None, "/my-app/scenarios", &Method::GET).unwrap();
        assert_eq!(m.operation(&Method::GET), "any");
    }

    #[test]
    fn hosts_win_over_catch_all() {
        let c = cfg();
        assert_eq!(
            route(&c, Some("api.example.com:8080"), "/x", &Method::GET)
                .unwrap()
                .deployment
                .name,
            "api-host"
        );
        assert_eq!(
            route(&c, Some("a.corp.example"), "/x", &Method::GET)
                .unwrap()
                .deployment
                .name,
            "api-host"
        );
        assert_eq!(
            route(&c, Some("corp.example"), "/x", &Method::GET)
                .unwrap()
                .deployment
                .name,
            "root"
        );
        assert_eq!(
            route(&c, Some("other"), "/x", &Method::GET)
                .unwrap()
                .deployment
                .name,
            "root"
        );
    }

    #[test]
    fn no_route_without_catch_all() {
        let c = Config::parse(
            Path::new("t.toml"),
            "[[deployments]]\nname = \"a\"\nupstream = \"echo\"\npath_prefix = \"/a\"\n",
        )
        .unwrap();
        assert!(route(&c, None, "/b", &Method::GET).is_none());
        assert_eq!(host_without_port("[::1]:80"), "::1");
    }
}
