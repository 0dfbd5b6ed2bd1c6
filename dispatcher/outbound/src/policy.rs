//! Which addresses account-configured requests may reach.
//!
//! A chain's `payment_webhook` URL is written by an account, not by the
//! operator; left unchecked it could reach the deployment's own network (a
//! metadata service, an admin port on loopback). So such requests are checked
//! against `[outbound]`: `deny` always refuses; `allow` permits; with
//! `only_allowed` nothing else is reached; otherwise public addresses are, and
//! private, loopback, link-local and other non-global ones are refused.
//!
//! Host names are checked twice: by name before the request, then every
//! address they resolve to, inside the HTTP client's resolver, so the address
//! connected to is the address checked (no window for DNS rebinding).
//! Endpoints the operator configures (SMS gateways, Twilio) are not checked.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use serde::Deserialize;

/// `[outbound]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// Hosts (`hooks.example.org`, `*.example.org`), addresses and networks
    /// (`10.1.2.3`, `10.0.0.0/8`) that account URLs may reach even when they
    /// are private or loopback.
    pub allow: Vec<String>,
    /// Hosts, addresses and networks account URLs may never reach.
    pub deny: Vec<String>,
    /// Reach nothing but what `allow` lists.
    pub only_allowed: bool,
}

/// One entry of `allow` or `deny`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Net(IpNet),
    Host(String),
    /// `*.example.org`: any name under `example.org`.
    Suffix(String),
}

impl Rule {
    fn parse(raw: &str) -> Result<Self, String> {
        let s = raw.trim().trim_end_matches('.').to_ascii_lowercase();
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Rule::Net(net));
        }
        if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
            return Ok(Rule::Net(IpNet::from(ip)));
        }
        let (name, suffix) = match s.strip_prefix("*.") {
            Some(rest) => (rest.to_string(), true),
            None => (s.clone(), false),
        };
        let valid = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(format!(
                "{raw:?} is neither a host name (hooks.example.org, *.example.org) nor an address \
                 or network (10.1.2.3, 10.0.0.0/8)"
            ));
        }
        Ok(if suffix {
            Rule::Suffix(format!(".{name}"))
        } else {
            Rule::Host(name)
        })
    }

    fn matches_host(&self, host: &str) -> bool {
        match self {
            Rule::Host(h) => h == host,
            Rule::Suffix(s) => host.ends_with(s.as_str()),
            Rule::Net(_) => false,
        }
    }

    fn matches_ip(&self, ip: IpAddr) -> bool {
        match self {
            Rule::Net(net) => net.contains(&canonical(ip)),
            _ => false,
        }
    }
}

/// The checked form of [`OutboundConfig`].
#[derive(Debug, Clone)]
pub struct OutboundPolicy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
    only_allowed: bool,
}

impl OutboundPolicy {
    /// Parses the configuration; an entry that is neither a host nor an
    /// address or network is named in the error.
    pub fn new(config: &OutboundConfig) -> Result<Self, String> {
        let parse = |list: &[String], key: &str| {
            list.iter()
                .map(|raw| Rule::parse(raw).map_err(|e| format!("outbound.{key}: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            allow: parse(&config.allow, "allow")?,
            deny: parse(&config.deny, "deny")?,
            only_allowed: config.only_allowed,
        })
    }

    /// Checks a host by name, before it is resolved: `Err` says why it is refused.
    pub fn check_host(&self, host: &str) -> Result<(), String> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            return self.check_ip(&host, ip);
        }
        if self.deny.iter().any(|r| r.matches_host(&host)) {
            return Err(format!("{host} is in outbound.deny"));
        }
        Ok(())
    }

    /// Checks one address `host` resolved to (or that `host` is).
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), String> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let ip = canonical(ip);
        let named = |r: &Rule| r.matches_host(&host) || r.matches_ip(ip);
        if self.deny.iter().any(named) {
            return Err(format!("{host} ({ip}) is in outbound.deny"));
        }
        if self.allow.iter().any(named) {
            return Ok(());
        }
        if self.only_allowed {
            return Err(format!(
                "{host} ({ip}) is not in outbound.allow, and outbound.only_allowed is set"
            ));
        }
        if !is_global(ip) {
            return Err(format!(
                "{host} is {ip}, a {} address; account URLs may not reach it unless the deployment \
                 lists it in outbound.allow",
                kind(ip)
            ));
        }
        Ok(())
    }
}

/// An IPv4 address mapped into IPv6 is checked as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is an ordinary address on the public internet.
fn is_global(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 192 && b == 0 && v4.octets()[2] == 0) // IETF protocol assignments
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || first == 0x2001 && v6.segments()[1] == 0x0db8) // documentation
        }
    }
}

fn kind(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => "loopback",
        IpAddr::V6(v6) if v6.is_loopback() => "loopback",
        IpAddr::V4(v4) if v4.is_private() => "private",
        IpAddr::V4(v4) if v4.is_link_local() => "link-local",
        IpAddr::V6(v6) if (v6.segments()[0] & 0xfe00) == 0xfc00 => "private (unique local)",
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => "link-local",
        _ => "non-public",
    }
}

/// Why the resolver refused a host: found in a reqwest error's sources.
#[derive(Debug)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// The HTTP client's resolver for account URLs: resolves, then keeps only the
/// addresses the policy permits.
#[derive(Debug, Clone)]
pub struct CheckedResolver {
    pub(super) policy: Arc<OutboundPolicy>,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refusals = Vec::new();
            let permitted: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check_ip(&host, a.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        refusals.push(why);
                        false
                    }
                })
                .collect();
            if permitted.is_empty() {
                let why = refusals
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| format!("{host} resolves to no address"));
                return Err(Box::new(Refusal(why)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(permitted.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str], only_allowed: bool) -> OutboundPolicy {
        OutboundPolicy::new(&OutboundConfig {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
            only_allowed,
        })
        .expect("a valid policy")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn private_and_loopback_addresses_are_refused_by_default() {
        let p = policy(&[], &[], false);
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            let why = p.check_ip("h", ip(refused)).expect_err(refused);
            assert!(why.contains("outbound.allow"), "{refused}: {why}");
        }
        for public in ["93.184.216.34", "2606:2800:220:1::1", "1.1.1.1"] {
            assert_eq!(p.check_ip("h", ip(public)), Ok(()), "{public}");
        }
    }

    #[test]
    fn allow_permits_and_deny_wins() {
        let p = policy(
            &["127.0.0.1/32", "hooks.internal", "*.corp.example"],
            &["169.254.169.254", "evil.example", "10.9.0.0/16"],
            false,
        );
        assert_eq!(p.check_ip("localhost", ip("127.0.0.1")), Ok(()));
        assert!(p.check_ip("localhost", ip("::1")).is_err());
        assert_eq!(p.check_ip("hooks.internal", ip("10.0.0.5")), Ok(()));
        assert_eq!(p.check_ip("a.corp.example", ip("10.0.0.6")), Ok(()));
        assert!(p.check_ip("corp.example", ip("10.0.0.6")).is_err());
        assert!(p.check_host("evil.example").is_err());
        assert!(p.check_host("EVIL.example.").is_err());
        assert!(p.check_ip("hooks.internal", ip("10.9.1.1")).is_err());
        assert!(p.check_host("169.254.169.254").is_err());
        assert_eq!(p.check_host("hooks.example.org"), Ok(()));
    }

    #[test]
    fn only_allowed_refuses_everything_else() {
        let p = policy(&["hooks.example.org"], &[], true);
        assert_eq!(p.check_ip("hooks.example.org", ip("93.184.216.34")), Ok(()));
        let why = p
            .check_ip("other.example.org", ip("93.184.216.34"))
            .expect_err("not listed");
        assert!(why.contains("only_allowed"), "{why}");
    }

    #[test]
    fn bad_entries_are_named() {
        let e = OutboundPolicy::new(&OutboundConfig {
            allow: vec!["not a host!".into()],
            ..Default::default()
        })
        .expect_err("a bad entry");
        assert!(
            e.contains("outbound.allow") && e.contains("not a host!"),
            "{e}"
        );
    }
}
