//! `host:port`, where the host is an IP address or a DNS name: how a sidecar reaches a part of the
//! control plane (in Kubernetes, a Service's name, whose address is not known when the
//! configuration is written).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// An IP or DNS host and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// IP address (without brackets) or DNS name.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl HostPort {
    /// The IP address, when the host is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl From<SocketAddr> for HostPort {
    fn from(a: SocketAddr) -> Self {
        HostPort {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

/// Why a `host:port` is not one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not host:port (an IP address or DNS name, and a port 1-65535)")]
pub struct HostPortError(String);

impl FromStr for HostPort {
    type Err = HostPortError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(a.into());
        }
        let bad = || HostPortError(s.to_string());
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if port == 0 || host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(bad());
        }
        Ok(HostPort {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip() {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl<'de> serde::Deserialize<'de> for HostPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_and_dns_names_parse_and_print_back() {
        for (s, host, port) in [
            ("10.0.0.1:8081", "10.0.0.1", 8081),
            ("[::1]:8081", "::1", 8081),
            (
                "polaris.polaris-system.svc:8081",
                "polaris.polaris-system.svc",
                8081,
            ),
            ("RLS:1", "rls", 1),
        ] {
            let h: HostPort = s.parse().unwrap();
            assert_eq!((h.host.as_str(), h.port), (host, port), "{s}");
            assert_eq!(h.to_string().parse::<HostPort>().unwrap(), h);
        }
        assert!("10.0.0.1:8081".parse::<HostPort>().unwrap().ip().is_some());
        assert!("rls.svc:1".parse::<HostPort>().unwrap().ip().is_none());
    }

    #[test]
    fn what_is_not_host_port_is_refused() {
        for s in [
            "",
            "rls",
            "rls:",
            "rls:0",
            "rls:70000",
            ":80",
            "a..b:80",
            "-a:80",
            "a b:80",
            "a_b:80",
        ] {
            assert!(s.parse::<HostPort>().is_err(), "{s}");
        }
    }
}
