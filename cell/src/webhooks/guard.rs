//! Where a webhook may go: `https://` URLs whose host resolves only to public addresses, so
//! that a tenant cannot make the cell call into the platform's own network (its metadata
//! service, a private range, loopback). An operator's allowlist (`--webhook-allow-cidr`)
//! names the ranges it lets through anyway, and `--webhook-allow-http` lets plain `http://`
//! reach those ranges only (what `cellmail up` does for loopback). Checked when an endpoint
//! is saved, and again at each delivery by the resolver the delivery connects through (DNS
//! can change), so the address checked is the address connected to.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::Uri;
use hyper_util::client::legacy::connect::dns::Name;
use ipnet::IpNet;

/// The operator's exceptions to the address policy.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    pub allow: Vec<IpNet>,
    pub allow_http: bool,
}

/// The longest a host's lookup may take.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The ranges a webhook never reaches unless the operator allows them, each with why, the
/// narrower first.
const REFUSED: [(&str, &str); 22] = [
    ("169.254.169.254/32", "the cloud metadata service"),
    ("168.63.129.16/32", "the cloud metadata service"),
    ("0.0.0.0/8", "not a host's"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "private"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "reserved"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::1/128", "loopback"),
    // IPv4-compatible and NAT64 addresses reach IPv4 ones, private ones too.
    ("::/96", "an IPv4 address in IPv6"),
    ("64:ff9b::/96", "NAT64"),
    ("64:ff9b:1::/48", "NAT64"),
    ("fc00::/7", "private"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
    ("2001:db8::/32", "for documentation"),
];

fn refused() -> &'static [(IpNet, &'static str)] {
    static PARSED: std::sync::LazyLock<Vec<(IpNet, &'static str)>> =
        std::sync::LazyLock::new(|| {
            // Constants: each parses (a unit test reads them all).
            (REFUSED.iter())
                .filter_map(|(net, why)| Some((net.parse().ok()?, *why)))
                .collect()
        });
    &PARSED
}

/// Why `ip` is not a public address, or `None` when it is.
fn private(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    (refused().iter())
        .find(|(net, _)| net.contains(&ip))
        .map(|(_, why)| *why)
}

impl Guard {
    /// Whether the cell may connect to `ip`, or why not.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        match private(ip) {
            Some(why) if !self.allow.iter().any(|net| net.contains(&ip)) => Err(format!(
                "{ip} is {why}: refused unless the operator allows it"
            )),
            _ => Ok(()),
        }
    }

    /// `url` parsed when it is one the cell may deliver to as far as the URL alone says (its
    /// scheme, and its address when it is one); the host's addresses are checked as it
    /// resolves ([`Guard::resolve`]).
    pub fn check_url(&self, url: &str) -> Result<Uri, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{} is not a URL: {e}", cellmail_proto::error::quote(url)))?;
        let host = uri.host().ok_or("has no host")?;
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err("may not carry credentials".into());
        }
        let literal = literal(host);
        if let Some(ip) = literal {
            self.check_ip(ip)?;
        }
        match uri.scheme_str() {
            Some("https") => Ok(uri),
            Some("http") if self.allow_http && literal.is_some_and(|ip| self.allowed(ip)) => {
                Ok(uri)
            }
            Some("http") if self.allow_http => {
                Err("plain http:// is only for addresses the operator allows, by address".into())
            }
            _ => Err("must be an https:// URL".into()),
        }
    }

    /// `url` parsed when the cell may deliver to it: [`Guard::check_url`], and a host name's
    /// every address checked now ([`Guard::resolve`]), as an endpoint is saved.
    pub async fn check_saved(&self, url: &str) -> Result<Uri, String> {
        let uri = self.check_url(url)?;
        let host = uri.host().unwrap_or_default();
        if literal(host).is_none() {
            self.resolve(host).await?;
        }
        Ok(uri)
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|net| net.contains(&ip))
    }

    /// `host`'s addresses, every one checked: one the cell may not connect to refuses the
    /// whole host.
    pub async fn resolve(&self, host: &str) -> Result<Vec<SocketAddr>, String> {
        let lookup = tokio::net::lookup_host((host, 0));
        let addrs: Vec<SocketAddr> = tokio::time::timeout(RESOLVE_TIMEOUT, lookup)
            .await
            .map_err(|_| format!("{host} did not resolve within {RESOLVE_TIMEOUT:?}"))?
            .map_err(|e| format!("{host} does not resolve: {e}"))?
            .collect();
        // The address itself stays unsaid: a tenant must not map the platform's network.
        for addr in &addrs {
            if let Some(why) = private(addr.ip()).filter(|_| !self.allowed(addr.ip())) {
                return Err(format!(
                    "{host} resolves to an address that is {why}: refused unless the operator allows it"
                ));
            }
        }
        Ok(addrs)
    }
}

/// The address a URL's host is, when it is one (`[…]` for IPv6) rather than a name.
fn literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// The resolver a delivery connects through: [`Guard::resolve`].
#[derive(Clone)]
pub struct Resolver(pub Guard);

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let guard = self.0.clone();
        Box::pin(async move {
            let addrs = guard
                .resolve(name.as_str())
                .await
                .map_err(std::io::Error::other)?;
            Ok(addrs.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_loopback_link_local_and_metadata_addresses_are_refused_unless_allowed() {
        let guard = Guard::default();
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.4.4",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "169.254.1.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "::a00:1",
            "fec0::1",
            "198.18.0.1",
            "240.0.0.1",
            "168.63.129.16",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(guard.check_ip(ip).is_err(), "{ip}");
        }
        assert_eq!(refused().len(), REFUSED.len(), "every range parses");
        for ip in ["93.184.216.34", "2606:4700::1111"] {
            assert!(guard.check_ip(ip.parse().unwrap()).is_ok(), "{ip}");
        }
        let metadata = guard.check_ip("169.254.169.254".parse().unwrap());
        assert!(metadata.unwrap_err().contains("metadata"));
        let loopback = Guard {
            allow: vec!["127.0.0.0/8".parse().unwrap()],
            allow_http: true,
        };
        assert!(loopback.check_ip("127.0.0.1".parse().unwrap()).is_ok());
        assert!(loopback.check_ip("10.0.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn urls_are_https_unless_plain_http_goes_to_an_allowed_address() {
        let guard = Guard::default();
        assert!(guard.check_url("https://hooks.example.com/x").is_ok());
        for bad in [
            "http://hooks.example.com/x",
            "ftp://hooks.example.com",
            "https://user:pw@hooks.example.com",
            "https://10.0.0.1/x",
            "https://[::1]:8443/x",
            "hooks.example.com/x",
        ] {
            assert!(guard.check_url(bad).is_err(), "{bad}");
        }
        let local = Guard {
            allow: vec!["127.0.0.0/8".parse().unwrap()],
            allow_http: true,
        };
        assert!(local.check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(local.check_url("http://hooks.example.com/x").is_err());
        assert!(local.check_url("http://10.0.0.1/x").is_err());
    }
}
