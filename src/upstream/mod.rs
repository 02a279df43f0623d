//! The FHIR server behind the gateway: its base URL, resolved addresses, and the Pingora peer
//! (TLS, SNI, timeouts) every request is sent to.

pub mod client;
pub mod head;
pub mod identity;
pub mod retry;

use crate::config::{TimeoutsConfig, UpstreamConfig};
use pingora_core::protocols::tls::CaType;
use pingora_core::upstreams::peer::HttpPeer;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// A normalised http(s) base URL: no trailing slash, no query, no fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub scheme: String,
    pub host: String,
    pub port: u16,
    /// Whether the URL spelt its port (`:8090`).
    pub explicit_port: bool,
    /// Path without a trailing slash (`""` for the root).
    pub path: String,
}

impl BaseUrl {
    pub fn parse(s: &str) -> Result<BaseUrl, String> {
        let uri: http::Uri = s.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => "http",
            Some("https") => "https",
            _ => return Err(format!("{s:?}: must be an http:// or https:// URL")),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{s:?}: has no host"))?;
        if uri.query().is_some() || s.contains('#') {
            return Err(format!("{s:?}: a base URL has no query or fragment"));
        }
        if s.contains('@') {
            return Err(format!("{s:?}: credentials do not belong in the URL"));
        }
        let default_port = if scheme == "https" { 443 } else { 80 };
        let path = uri.path().trim_end_matches('/').to_string();
        Ok(BaseUrl {
            scheme: scheme.into(),
            host: host.to_ascii_lowercase(),
            port: uri.port_u16().unwrap_or(default_port),
            explicit_port: uri.port_u16().is_some(),
            path,
        })
    }

    pub fn is_tls(&self) -> bool {
        self.scheme == "https"
    }

    fn default_port(&self) -> u16 {
        if self.is_tls() {
            443
        } else {
            80
        }
    }

    /// `host[:port]`, the port only when it is not the scheme's default (the `Host` header).
    pub fn authority(&self) -> String {
        if self.port == self.default_port() {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The canonical string form: `scheme://authority/path`.
    pub fn as_string(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority(), self.path)
    }

    /// Every spelling a server may use for this base: with and without the default port.
    pub fn spellings(&self) -> Vec<String> {
        let mut v = vec![self.as_string()];
        if self.port == self.default_port() {
            v.push(format!(
                "{}://{}:{}{}",
                self.scheme, self.host, self.port, self.path
            ));
        }
        v
    }
}

impl BaseUrl {
    /// The spellings of this base, plus, when its host is a loopback address or `localhost`,
    /// the same scheme, port and path on the other loopback names (`localhost`, `127.0.0.1`,
    /// `[::1]`): on one machine these are the same server, so a URL the server builds from
    /// the `Host` it was sent (Bulk Data's `request`) is still recognised as its own.
    pub fn alias_spellings(&self) -> Vec<String> {
        let mut v = self.spellings();
        let loopback = self.host == "localhost"
            || self
                .host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if loopback {
            for host in ["localhost", "127.0.0.1", "[::1]"] {
                let other = BaseUrl {
                    host: host.into(),
                    ..self.clone()
                };
                for sp in other.spellings() {
                    if !v.contains(&sp) {
                        v.push(sp);
                    }
                }
            }
        }
        v
    }

    /// The path (and query) below this base of an absolute URL of the server, in any of its
    /// `alias_spellings`; `None` for any other URL.
    pub fn path_below(&self, url: &str) -> Option<String> {
        self.alias_spellings().iter().find_map(|sp| {
            let rest = url.strip_prefix(sp.as_str())?;
            (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
                .then(|| rest.to_string())
        })
    }
}

/// Runtime view of the FHIR server.
pub struct Upstream {
    pub base: BaseUrl,
    sni: String,
    verify: bool,
    ca: Option<Arc<CaType>>,
    timeouts: TimeoutsConfig,
    addrs: RwLock<Vec<SocketAddr>>,
    /// `Host` of every upstream request, built once (cloning it is a reference count).
    host: http::HeaderValue,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Result<Upstream, String> {
        let base = BaseUrl::parse(&cfg.url)?;
        let ca = match &cfg.tls.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
                let certs = pingora_core::tls::x509::X509::stack_from_pem(&pem)
                    .map_err(|e| format!("{path}: not a PEM certificate bundle: {e}"))?;
                if certs.is_empty() {
                    return Err(format!("{path}: no certificate in the file"));
                }
                Some(Arc::new(certs.into_boxed_slice()))
            }
            None => None,
        };
        let up = Upstream {
            sni: cfg.tls.sni.clone().unwrap_or_else(|| base.host.clone()),
            verify: cfg.tls.verify,
            ca,
            timeouts: cfg.timeouts,
            addrs: RwLock::new(Vec::new()),
            host: http::HeaderValue::from_str(&base.authority())
                .map_err(|_| format!("{}: not a valid Host", base.authority()))?,
            base,
        };
        // Resolve once at start so a typo fails `-t`; the health task re-resolves later.
        up.resolve()?;
        Ok(up)
    }

    /// (Re-)resolves the host name. Keeps the previous addresses when resolution fails.
    pub fn resolve(&self) -> Result<(), String> {
        let addrs: Vec<SocketAddr> = (self.base.host.trim_matches(['[', ']']), self.base.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.base.host))?
            .collect();
        if addrs.is_empty() {
            return Err(format!("{} resolves to no address", self.base.host));
        }
        *self.addrs.write().expect("addr lock") = addrs;
        Ok(())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs.read().expect("addr lock")[0]
    }

    pub fn timeouts(&self) -> &TimeoutsConfig {
        &self.timeouts
    }

    /// The Pingora peer for one attempt. Pingora has no default timeouts, so all are set here.
    pub fn peer(&self) -> HttpPeer {
        let mut peer = HttpPeer::new(self.addr(), self.base.is_tls(), self.sni.clone());
        let t = &self.timeouts;
        let o = &mut peer.options;
        o.connection_timeout = Some(Duration::from_millis(t.connect_ms));
        o.total_connection_timeout = Some(Duration::from_millis(t.connect_ms + t.tls_handshake_ms));
        o.read_timeout = Some(Duration::from_millis(t.read_ms));
        o.write_timeout = Some(Duration::from_millis(t.write_ms));
        o.idle_timeout = Some(Duration::from_millis(t.idle_ms));
        o.verify_cert = self.verify;
        o.verify_hostname = self.verify;
        o.ca = self.ca.clone();
        peer
    }

    /// The `Host` header of upstream requests: the base URL's authority.
    pub fn host(&self) -> &http::HeaderValue {
        &self.host
    }

    /// Upstream path for a request path relative to the public prefix (`/Patient/1` or `""`).
    pub fn path_for(&self, rest: &str) -> String {
        let mut p = String::with_capacity(self.base.path.len() + rest.len() + 1);
        p.push_str(&self.base.path);
        p.push_str(rest);
        if p.is_empty() {
            p.push('/');
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_normalises() {
        let a = BaseUrl::parse("http://127.0.0.1:8090/fhir/").unwrap();
        let b = BaseUrl::parse("http://127.0.0.1:8090/fhir").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_string(), "http://127.0.0.1:8090/fhir");
        assert_eq!(a.authority(), "127.0.0.1:8090");
        let h = BaseUrl::parse("HTTPS://Fhir.Example.org:443").unwrap();
        assert_eq!(h.as_string(), "https://fhir.example.org");
        assert_eq!(
            h.spellings(),
            vec!["https://fhir.example.org", "https://fhir.example.org:443"]
        );
        assert!(BaseUrl::parse("ftp://x/").is_err());
        assert!(BaseUrl::parse("http://x/fhir?a=b").is_err());
        assert!(BaseUrl::parse("http://user:pw@x/fhir").is_err());
        assert!(BaseUrl::parse("/fhir").is_err());
    }

    #[test]
    fn loopback_aliases_are_the_same_server() {
        let b = BaseUrl::parse("http://127.0.0.1:8090/fhir").unwrap();
        assert_eq!(
            b.path_below("http://localhost:8090/fhir/Patient/$export?_type=Patient")
                .as_deref(),
            Some("/Patient/$export?_type=Patient")
        );
        assert_eq!(b.path_below("http://[::1]:8090/fhir").as_deref(), Some(""));
        assert_eq!(
            b.path_below("http://127.0.0.1:8090/fhir/bulk-status/1")
                .as_deref(),
            Some("/bulk-status/1")
        );
        // Another port, scheme, path or host is another server.
        assert_eq!(b.path_below("http://localhost:8091/fhir/x"), None);
        assert_eq!(b.path_below("https://localhost:8090/fhir/x"), None);
        assert_eq!(b.path_below("http://127.0.0.1:8090/fhirx/x"), None);
        assert_eq!(b.path_below("http://10.0.0.1:8090/fhir/x"), None);
        // A server with a real name has no aliases.
        let h = BaseUrl::parse("https://fhir.example.org/r4").unwrap();
        assert_eq!(h.alias_spellings().len(), 2);
        assert_eq!(h.path_below("https://localhost/r4/x"), None);
        assert_eq!(
            h.path_below("https://fhir.example.org:443/r4/x").as_deref(),
            Some("/x")
        );
    }
}
