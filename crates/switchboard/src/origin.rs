//! Which web pages may open `/ws`: the `Origin` check at the upgrade.
//!
//! Browsers send `Origin` with every WebSocket handshake, and a page can't
//! forge it, so checking it stops a hostile page that a user happens to visit
//! from opening sockets in that user's name (cross-site WebSocket hijacking).
//!
//! `SWITCHBOARD_ALLOWED_ORIGINS` decides:
//! - empty (the default): only the server's own pages. Which origin that is
//!   comes from `SWITCHBOARD_PUBLIC_URL` when it is set. Otherwise an `Origin`
//!   whose `host[:port]` equals the request's `Host` header passes only when
//!   that host is an IP address or `localhost`: a page on a domain name
//!   controls `Host` through DNS rebinding (its name made to resolve to this
//!   server), so `Origin == Host` proves nothing there. The bundled call page
//!   works out of the box on `localhost` and IP addresses; on a domain name,
//!   set `SWITCHBOARD_PUBLIC_URL` (or list the origin).
//! - a comma-separated list such as `https://app.example.com,http://localhost:3000`:
//!   those origins, in addition to the server's own pages.
//! - `*`: any origin (only for services that protect `/ws` with signed links).
//!
//! A request without `Origin` is not from a browser page (curl, native apps,
//! other servers) and is let through: such a client could send any `Origin` it
//! likes, so refusing it would protect nothing. Signed links
//! (`SWITCHBOARD_AUTH_SECRET`) are what restricts those clients.

use axum::http::header::{HOST, ORIGIN};
use axum::http::{HeaderMap, Uri};

/// The parsed `SWITCHBOARD_ALLOWED_ORIGINS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedOrigins {
    any: bool,
    /// Normalized `scheme://host[:port]` entries.
    list: Vec<String>,
    /// The origin of `SWITCHBOARD_PUBLIC_URL`, normalized: the server's own pages.
    public: Option<String>,
}

/// `scheme://host[:port]` in lower case, without a default port, or `None` if
/// `origin` is not of that form (paths, queries, user info and `null` are not).
pub fn normalize(origin: &str) -> Option<String> {
    let uri: Uri = origin.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let authority = uri.authority()?;
    if authority.as_str().contains('@')
        || uri.path_and_query().is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return None;
    }
    if origin.ends_with('/') {
        return None;
    }
    let host = authority.host().to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    Some(match authority.port_u16() {
        Some(port) if Some(port) != default_port(&scheme) => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

impl AllowedOrigins {
    /// Parses a comma-separated list of origins, `*`, or nothing (same origin only).
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut allowed = Self::default();
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" {
                allowed.any = true;
                continue;
            }
            let origin = normalize(entry)
                .ok_or_else(|| format!("{entry:?} is not an origin like https://app.example.com (no path, no /)"))?;
            if !allowed.list.contains(&origin) {
                allowed.list.push(origin);
            }
        }
        Ok(allowed)
    }

    /// The same, with the origin of `public_url` (`http(s)://host[:port][/path]`)
    /// as the server's own pages.
    pub fn with_public_url(mut self, public_url: Option<&str>) -> Self {
        self.public = public_url.and_then(|url| {
            let (scheme, rest) = url.split_once("://")?;
            normalize(&format!("{scheme}://{}", rest.split('/').next()?))
        });
        self
    }

    /// Whether every origin is allowed (`*`).
    pub fn allows_any(&self) -> bool {
        self.any
    }

    /// The listed origins, normalized.
    pub fn listed(&self) -> &[String] {
        &self.list
    }

    /// Whether a request with these headers may upgrade.
    pub fn permits(&self, headers: &HeaderMap) -> bool {
        let mut origins = headers.get_all(ORIGIN).iter();
        let Some(origin) = origins.next() else {
            return true; // not a browser page
        };
        if origins.next().is_some() {
            return false; // browsers send one; two is an attempt to confuse
        }
        if self.any {
            return true;
        }
        let Some(origin) = origin.to_str().ok().and_then(normalize) else {
            return false; // includes `null` (sandboxed frames, file:// pages)
        };
        if self.list.contains(&origin) || self.public.as_ref() == Some(&origin) {
            return true;
        }
        // `Host` is trusted only where DNS can't have pointed a page's name here.
        let host = headers.get(HOST).and_then(|h| h.to_str().ok());
        host.is_some_and(|host| same_origin(&origin, host) && is_ip_or_localhost(host))
    }
}

/// Whether the host of `host[:port]` is an IP address or `localhost` (a name
/// that never resolves through DNS, RFC 6761), so no other site's page can
/// share it by DNS rebinding.
fn is_ip_or_localhost(host: &str) -> bool {
    let Ok(authority) = host.parse::<axum::http::uri::Authority>() else {
        return false;
    };
    let name = authority.host().to_ascii_lowercase();
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>().is_ok() || name == "localhost" || name.ends_with(".localhost")
}

/// Whether the normalized `origin` names the server reached through `host`.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, origin_authority)) = origin.split_once("://") else {
        return false;
    };
    // The same normalization as the origin, with the origin's scheme for the default port.
    normalize(&format!("{scheme}://{host}"))
        .is_some_and(|h| h.split_once("://").map(|(_, a)| a) == Some(origin_authority))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_str(host).unwrap());
        if let Some(o) = origin {
            h.insert(ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        h
    }

    #[test]
    fn normalizes_origins() {
        assert_eq!(normalize("HTTPS://App.Example.com").as_deref(), Some("https://app.example.com"));
        assert_eq!(normalize("https://app.example.com:443").as_deref(), Some("https://app.example.com"));
        assert_eq!(normalize("http://localhost:3000").as_deref(), Some("http://localhost:3000"));
        assert_eq!(normalize("http://[::1]:8080").as_deref(), Some("http://[::1]:8080"));
        for bad in ["null", "", "app.example.com", "https://x/path", "https://x/", "https://u@x", "https://x?q", "*"] {
            assert_eq!(normalize(bad), None, "{bad}");
        }
    }

    #[test]
    fn default_is_same_origin_plus_non_browsers() {
        let allowed = AllowedOrigins::parse("").unwrap();
        assert!(allowed.permits(&headers(None, "127.0.0.1:8080")));
        assert!(allowed.permits(&headers(Some("http://127.0.0.1:8080"), "127.0.0.1:8080")));
        let public = AllowedOrigins::parse("").unwrap().with_public_url(Some("https://call.example.com"));
        assert!(public.permits(&headers(Some("https://call.example.com"), "call.example.com")));
        assert!(public.permits(&headers(Some("https://call.example.com"), "CALL.example.com:443")));
        assert!(!allowed.permits(&headers(Some("http://127.0.0.1:8081"), "127.0.0.1:8080")));
        assert!(!allowed.permits(&headers(Some("https://evil.example"), "call.example.com")));
        assert!(!allowed.permits(&headers(Some("http://call.example.com:443"), "call.example.com")));
        assert!(!allowed.permits(&headers(Some("null"), "127.0.0.1:8080")));
        let mut two = headers(Some("http://127.0.0.1:8080"), "127.0.0.1:8080");
        two.append(ORIGIN, HeaderValue::from_static("http://127.0.0.1:8080"));
        assert!(!allowed.permits(&two));
    }

    #[test]
    fn dns_rebinding_cannot_pass_the_same_origin_check() {
        // Issue 16: a page on evil.example whose name was made to resolve to this
        // server sends `Origin: http://evil.example:8080` and `Host: evil.example:8080`.
        let rebound = headers(Some("http://evil.example:8080"), "evil.example:8080");
        let public = AllowedOrigins::parse("").unwrap().with_public_url(Some("https://call.example.com/app/"));
        assert!(!public.permits(&rebound), "a forged Host matching Origin passed with a public URL set");
        // Without a public URL, Host equality counts only for IP addresses and localhost.
        let default = AllowedOrigins::parse("").unwrap();
        assert!(!default.permits(&rebound));
        assert!(!default.permits(&headers(Some("https://call.example.com"), "call.example.com")));
        for host in ["127.0.0.1:8080", "10.1.2.3:80", "[::1]:8080", "localhost:8080", "LocalHost:8080", "a.localhost:1"]
        {
            assert!(default.permits(&headers(Some(&format!("http://{host}")), host)), "{host}");
        }
        assert!(!default.permits(&headers(Some("http://localhost.evil.example:1"), "localhost.evil.example:1")));
        // With it, its origin is the server's own, whatever Host says; other origins are not.
        assert!(public.permits(&headers(Some("https://call.example.com"), "10.0.0.5:8080")));
        assert!(!public.permits(&headers(Some("http://call.example.com"), "call.example.com")));
        assert!(!public.permits(&headers(Some("https://evil.example"), "call.example.com")));
        assert!(public.permits(&headers(Some("http://127.0.0.1:8080"), "127.0.0.1:8080")));
        let port = AllowedOrigins::parse("").unwrap().with_public_url(Some("http://call.example.com:8443"));
        assert!(port.permits(&headers(Some("http://call.example.com:8443"), "x")));
        assert!(!port.permits(&headers(Some("http://call.example.com"), "call.example.com")));
    }

    #[test]
    fn lists_and_wildcard() {
        let allowed = AllowedOrigins::parse(" https://app.example.com , http://localhost:3000")
            .unwrap()
            .with_public_url(Some("https://relay.example.com"));
        assert_eq!(allowed.listed(), ["https://app.example.com", "http://localhost:3000"]);
        assert!(allowed.permits(&headers(Some("https://app.example.com"), "relay.example.com")));
        assert!(allowed.permits(&headers(Some("http://localhost:3000"), "relay.example.com")));
        assert!(allowed.permits(&headers(Some("https://relay.example.com"), "relay.example.com")));
        assert!(!allowed.permits(&headers(Some("http://app.example.com"), "relay.example.com")));
        let any = AllowedOrigins::parse("*").unwrap();
        assert!(any.allows_any());
        assert!(any.permits(&headers(Some("https://anything.example"), "relay.example.com")));
        assert!(any.permits(&headers(Some("null"), "relay.example.com")));
        assert!(AllowedOrigins::parse("https://x/path").is_err());
        assert!(AllowedOrigins::parse("example.com").is_err());
    }
}
