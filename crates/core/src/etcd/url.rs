//! Parsing `etcd://host:port[,host:port...]/prefix` (and `etcds://` for TLS).

use crate::error::{Error, Result};

/// A parsed cluster location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClusterUrl {
    /// `etcds://`: the client connects over TLS.
    pub tls: bool,
    /// `host:port` of each member, as given (order kept: the client balances over all).
    pub endpoints: Vec<String>,
    /// The key prefix everything of this store lives under: the URL's path with its leading
    /// slash (`etcd://h:2379/myapp` → `/myapp`, as etcd keys and role permissions are usually
    /// spelled); no trailing slash.
    pub prefix: String,
}

impl ClusterUrl {
    pub fn parse(url: &str) -> Result<ClusterUrl> {
        let bad = |why: &str| Error::invalid(format!("malformed etcd URL '{url}': {why}"));
        // The scheme is case-insensitive (RFC 3986).
        let (tls, rest) = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("etcd") => (false, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("etcds") => (true, rest),
            _ => return Err(bad("it must start with etcd:// or etcds://")),
        };
        let (hosts, prefix) = rest
            .split_once('/')
            .ok_or_else(|| bad("a /prefix must follow the endpoints"))?;
        if prefix.is_empty() {
            return Err(bad("the prefix after the endpoints must not be empty"));
        }
        if prefix.ends_with('/') {
            return Err(bad("the prefix must not end with '/'"));
        }
        if prefix.contains('\0') || prefix.contains('?') || prefix.contains('#') {
            return Err(bad("the prefix must not contain NUL, '?' or '#'"));
        }
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let (name, port) = host
                .rsplit_once(':')
                .ok_or_else(|| bad(&format!("endpoint '{host}' must be host:port")))?;
            let name_ok = !name.is_empty()
                && name.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']' | ':')
                });
            if !name_ok {
                return Err(bad(&format!("endpoint '{host}' has no valid host name")));
            }
            match port.parse::<u16>() {
                Ok(p) if p > 0 => {}
                _ => return Err(bad(&format!("endpoint '{host}' has no valid port"))),
            }
            endpoints.push(host.to_string());
        }
        Ok(ClusterUrl {
            tls,
            endpoints,
            prefix: format!("/{prefix}"),
        })
    }

    /// The endpoints as the client wants them (`http://` or `https://`).
    pub fn client_endpoints(&self) -> Vec<String> {
        let scheme = if self.tls { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect()
    }

    /// The same cluster and prefix whatever the spelling: endpoints lower-cased and sorted.
    pub fn normalized(&self) -> String {
        let mut endpoints: Vec<String> = self.endpoints.iter().map(|e| e.to_lowercase()).collect();
        endpoints.sort();
        endpoints.dedup();
        let scheme = if self.tls { "etcds" } else { "etcd" };
        format!("{scheme}://{}{}", endpoints.join(","), self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_is_case_insensitive_and_a_near_miss_is_malformed() {
        assert!(ClusterUrl::parse("ETCD://h:1/app").is_ok_and(|u| !u.tls));
        assert!(ClusterUrl::parse("Etcds://h:1/app").is_ok_and(|u| u.tls));
        for near in ["etcd:/h:1/app", "etcd:h:1/app", "ETCDS:/h:1/app"] {
            assert!(crate::store::Database::is_cluster_url(near), "{near}");
            let err = ClusterUrl::parse(near).unwrap_err();
            assert!(
                err.to_string().contains("malformed etcd URL"),
                "{near}: {err}"
            );
        }
        for file in ["./etcd:x", "etcd.redb", "/data/etcd://x", "etcdx://h:1/a"] {
            assert!(!crate::store::Database::is_cluster_url(file), "{file}");
        }
    }

    #[test]
    fn parses_endpoints_and_prefix() {
        let u = ClusterUrl::parse("etcd://10.0.0.1:2379,host-b:2380/myapp").unwrap();
        assert!(!u.tls);
        assert_eq!(u.endpoints, vec!["10.0.0.1:2379", "host-b:2380"]);
        assert_eq!(u.prefix, "/myapp");
        assert_eq!(
            u.client_endpoints(),
            vec!["http://10.0.0.1:2379", "http://host-b:2380"]
        );
        let t = ClusterUrl::parse("etcds://h:1/a/b").unwrap();
        assert!(t.tls);
        assert_eq!(t.prefix, "/a/b");
        assert_eq!(
            ClusterUrl::parse("etcd://B:2,a:1/p").unwrap().normalized(),
            ClusterUrl::parse("etcd://a:1,b:2/p").unwrap().normalized()
        );
    }

    #[test]
    fn malformed_urls_are_invalid_arguments() {
        for url in [
            "http://h:1/p",
            "etcd://h:1",
            "etcd://h:1/",
            "etcd://h:1/p/",
            "etcd://h/p",
            "etcd://h:x/p",
            "etcd://h:0/p",
            "etcd://:1/p",
            "etcd://h:1,/p",
            "etcd:///p",
            "etcd://h w:1/p",
        ] {
            let err = ClusterUrl::parse(url).unwrap_err();
            assert_eq!(err.code(), crate::ErrorCode::InvalidArgument, "{url}");
        }
    }
}
