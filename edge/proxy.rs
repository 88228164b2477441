//! Who the client is, behind load balancers and proxies.
//!
//! A peer whose address is in `trusted-proxies` is a proxy, not a client; its word about the
//! client is believed, and nobody else's:
//! * with `proxy-protocol`, every connection from a trusted proxy starts with a PROXY protocol
//!   header (v1 text or v2 binary, read with `ppp`), which names the client; a connection from
//!   a trusted proxy without one is closed (guessing would let a client that reached the node
//!   through a misconfigured proxy forge its own header), and one from any other peer that
//!   starts with a PROXY header is refused. A header that names no client (v2 `LOCAL`, v1
//!   `UNKNOWN`: the proxy's own health checks) leaves the proxy as the client.
//! * per request, when the address the node sees (the peer, or the PROXY header's client) is a
//!   trusted proxy, the client is the right-most address of `X-Forwarded-For` (or `Forwarded`,
//!   `client-address-header`) that is not itself a trusted proxy: proxies append the address
//!   they saw, so entries left of it may be anything the client wrote. When every entry is
//!   trusted, the left-most is the client; when the header is missing or the entry does not
//!   parse, the proxy is.
//!
//! Everything per address (pending connections, handshake rate, sockets per address) and every
//! log line use the address found here. Nothing here reads or writes a socket after the PROXY
//! header: [`read_header`] consumes exactly the header's bytes (it peeks, then reads what it
//! parsed), so the stream that follows is the client's own.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use http::HeaderMap;
use ipnet::IpNet;
use tokio::{io::AsyncReadExt, net::TcpStream, time::Instant};

use crate::error::BadProxies;

/// The longest PROXY header taken: v1 is at most 107 bytes, v2 is 16 plus its addresses and
/// TLVs (HAProxy's, with TLS details, stay well under this).
const MAX_HEADER: usize = 1024;

/// How long to wait for more bytes of a PROXY header that arrived in pieces.
const PIECE_WAIT: Duration = Duration::from_millis(5);

/// The v2 signature; a v1 header starts with `PROXY `.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_SIGNATURE: &[u8] = b"PROXY ";

/// Which header a trusted proxy names the client in (`client-address-header`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddressHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`.
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    Forwarded,
    /// None: with `proxy-protocol` only.
    None,
}

impl AddressHeader {
    /// Reads the setting's value.
    pub(crate) fn parse(text: &str) -> Result<Self, BadProxies> {
        match text.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(Self::XForwardedFor),
            "forwarded" => Ok(Self::Forwarded),
            "none" => Ok(Self::None),
            _ => Err(BadProxies::Header(text.to_owned())),
        }
    }
}

/// Parses `trusted-proxies` entries: networks (`10.0.0.0/8`) or single addresses.
pub(crate) fn parse_trusted(entries: &[String]) -> Result<Vec<IpNet>, BadProxies> {
    entries
        .iter()
        .map(|entry| {
            let entry = entry.trim();
            entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| BadProxies::Network(entry.to_owned()))
        })
        .collect()
}

/// The node's trusted proxies and how they name clients.
#[derive(Debug, Clone)]
pub(crate) struct Proxies {
    trusted: Vec<IpNet>,
    header: AddressHeader,
    protocol: bool,
}

impl Proxies {
    /// From the settings (already checked by the configuration).
    pub(crate) fn new(trusted: Vec<IpNet>, header: AddressHeader, protocol: bool) -> Self {
        Self {
            trusted,
            header,
            protocol,
        }
    }

    /// Whether `ip` is a trusted proxy.
    pub(crate) fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// Whether connections from trusted proxies start with a PROXY header.
    pub(crate) fn expects_protocol(&self) -> bool {
        self.protocol
    }

    /// The client of a request that reached the node from `from` (the peer, or the client a
    /// PROXY header named): `from` itself, unless it is a trusted proxy that named the client
    /// in the request's headers.
    pub(crate) fn client(&self, from: SocketAddr, headers: &HeaderMap) -> SocketAddr {
        if self.header == AddressHeader::None || !self.trusts(from.ip()) {
            return from;
        }
        let hops = match self.header {
            AddressHeader::XForwardedFor => x_forwarded_for(headers),
            AddressHeader::Forwarded => forwarded(headers),
            AddressHeader::None => return from,
        };
        let mut client = from;
        for hop in hops.iter().rev() {
            match hop {
                Some(hop) => {
                    client = *hop;
                    if !self.trusts(hop.ip()) {
                        break;
                    }
                }
                // A hop a trusted proxy wrote that does not parse: the proxy is all we know.
                None => break,
            }
        }
        client
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, what a dual-stack listener reports) as the
/// IPv4 addresses they are, so both spellings match the same networks and share one count.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// One hop of a forwarding header: an address, with its port when it has one (else 0).
fn hop(text: &str) -> Option<SocketAddr> {
    let text = text.trim().trim_matches('"');
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(SocketAddr::new(canonical(addr.ip()), addr.port()));
    }
    let bare = text.strip_prefix('[').and_then(|t| t.strip_suffix(']'));
    bare.unwrap_or(text)
        .parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(canonical(ip), 0))
}

/// The hops of every `X-Forwarded-For` header, left to right (`None` for one that does not
/// parse).
fn x_forwarded_for(headers: &HeaderMap) -> Vec<Option<SocketAddr>> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|value| {
            let text = value.to_str().unwrap_or("\u{0}");
            text.split(',').map(hop).collect::<Vec<_>>()
        })
        .collect()
}

/// The `for=` hops of every `Forwarded` header, left to right (`None` for an element without
/// a usable `for`: `unknown`, an obfuscated name, garbage).
fn forwarded(headers: &HeaderMap) -> Vec<Option<SocketAddr>> {
    headers
        .get_all(http::header::FORWARDED)
        .iter()
        .flat_map(|value| {
            let text = value.to_str().unwrap_or("\u{0}");
            text.split(',')
                .map(|element| {
                    element.split(';').find_map(|pair| {
                        let (key, value) = pair.split_once('=')?;
                        key.trim().eq_ignore_ascii_case("for").then(|| hop(value))?
                    })
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What a PROXY header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Preamble {
    /// The client's address.
    Client(SocketAddr),
    /// No client: the proxy's own connection (v2 `LOCAL`, v1 `UNKNOWN`, a Unix socket).
    Local,
}

/// The outcome of parsing the start of a connection as a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A whole header of this many bytes.
    Complete(usize, Preamble),
    /// The start of one; more bytes are needed.
    Incomplete,
    /// Not a PROXY header, or a malformed one.
    Invalid,
}

/// Parses `input` as the start of a connection that must begin with a PROXY header.
pub(crate) fn parse_header(input: &[u8]) -> Parsed {
    use ppp::{v1, v2, HeaderResult, PartialResult};
    let result = HeaderResult::parse(input);
    if result.is_incomplete() {
        return Parsed::Incomplete;
    }
    match result {
        HeaderResult::V2(Ok(header)) => {
            let preamble = match (header.command, header.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Preamble::Client(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Preamble::Client(SocketAddr::new(
                    canonical(IpAddr::V6(a.source_address)),
                    a.source_port,
                )),
                _ => Preamble::Local,
            };
            Parsed::Complete(header.len(), preamble)
        }
        HeaderResult::V1(Ok(header)) => {
            let preamble = match header.addresses {
                v1::Addresses::Tcp4(a) => {
                    Preamble::Client(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                v1::Addresses::Tcp6(a) => Preamble::Client(SocketAddr::new(
                    canonical(IpAddr::V6(a.source_address)),
                    a.source_port,
                )),
                v1::Addresses::Unknown => Preamble::Local,
            };
            Parsed::Complete(header.header.len(), preamble)
        }
        HeaderResult::V1(Err(_)) | HeaderResult::V2(Err(_)) => Parsed::Invalid,
    }
}

/// Whether `start` (the first bytes a peer sent) is the start of a PROXY header.
pub(crate) fn looks_like_header(start: &[u8]) -> bool {
    let n = start.len().min(V2_SIGNATURE.len());
    !start.is_empty()
        && (start[..n] == V2_SIGNATURE[..n]
            || start[..start.len().min(V1_SIGNATURE.len())]
                == V1_SIGNATURE[..start.len().min(V1_SIGNATURE.len())])
}

/// Why a trusted proxy's connection was closed before its PROXY header was taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeaderError {
    #[error("no PROXY header within the handshake timeout")]
    Timeout,
    #[error("the connection closed before its PROXY header")]
    Closed,
    #[error("not a PROXY header (a trusted proxy must send one first)")]
    Invalid,
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the PROXY header a trusted proxy's connection starts with, by `deadline`: exactly its
/// bytes, so what follows is the client's.
pub(crate) async fn read_header(
    stream: &mut TcpStream,
    deadline: Instant,
) -> Result<Preamble, HeaderError> {
    let mut buf = vec![0; MAX_HEADER];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .map_err(|_| HeaderError::Timeout)??;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        match parse_header(&buf[..n]) {
            Parsed::Complete(len, preamble) => {
                stream.read_exact(&mut buf[..len]).await?;
                return Ok(preamble);
            }
            Parsed::Invalid => return Err(HeaderError::Invalid),
            Parsed::Incomplete if n == buf.len() => return Err(HeaderError::TooLong),
            // A header in pieces (proxies send it whole; a peek sees what came so far).
            Parsed::Incomplete => {
                if Instant::now() + PIECE_WAIT > deadline {
                    return Err(HeaderError::Timeout);
                }
                tokio::time::sleep(PIECE_WAIT).await;
            }
        }
    }
}

/// Any bytes at the start of a trusted proxy's connection: a whole PROXY header (no longer than
/// the input), the start of one, or a refusal, never a panic. The same bytes, line by line, as
/// `X-Forwarded-For` and `Forwarded` headers of a request from a trusted proxy: the client
/// found is the proxy or one of the hops, and never one left of a hop that is not a trusted
/// proxy (what lies left of the first untrusted hop is the client's own writing).
#[cfg(any(test, fuzzing))]
pub(crate) fn check_proxy_header(input: &[u8]) {
    if let Parsed::Complete(len, _) = parse_header(input) {
        assert!(len > 0 && len <= input.len(), "{len} of {}", input.len());
    }
    let _ = looks_like_header(input);
    let mut headers = HeaderMap::new();
    for line in input.split(|b| *b == b'\n') {
        if let Ok(value) = http::HeaderValue::from_bytes(line) {
            headers.append("x-forwarded-for", value.clone());
            headers.append(http::header::FORWARDED, value);
        }
    }
    let trusted =
        parse_trusted(&["127.0.0.0/8".into(), "10.0.0.0/8".into()]).expect("valid networks");
    let from = SocketAddr::from(([127, 0, 0, 1], 1));
    for header in [AddressHeader::XForwardedFor, AddressHeader::Forwarded] {
        let proxies = Proxies::new(trusted.clone(), header, false);
        let client = proxies.client(from, &headers);
        let hops = match header {
            AddressHeader::XForwardedFor => x_forwarded_for(&headers),
            _ => forwarded(&headers),
        };
        if client == from {
            continue;
        }
        let at = hops
            .iter()
            .rposition(|h| *h == Some(client))
            .unwrap_or_else(|| panic!("{client} is not a hop of {hops:?}"));
        assert!(
            hops[at + 1..]
                .iter()
                .all(|h| h.is_some_and(|h| proxies.trusts(h.ip()))),
            "{client} is left of an untrusted hop in {hops:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn proxies(header: AddressHeader) -> Proxies {
        let trusted = parse_trusted(&["10.0.0.0/8".into(), "192.168.1.1".into()]).unwrap();
        Proxies::new(trusted, header, false)
    }

    fn headers(name: &'static str, values: &[&'static str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(name, HeaderValue::from_static(v));
        }
        map
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let p = proxies(AddressHeader::XForwardedFor);
        let via_proxy = addr("10.1.2.3:5000");
        // A forged left part does not matter.
        let h = headers("x-forwarded-for", &["6.6.6.6, 203.0.113.9, 10.0.0.7"]);
        assert_eq!(p.client(via_proxy, &h).ip(), addr("203.0.113.9:0").ip());
        // Several headers are one list, in order.
        let h = headers(
            "x-forwarded-for",
            &["6.6.6.6", "203.0.113.9", "192.168.1.1"],
        );
        assert_eq!(p.client(via_proxy, &h).ip(), addr("203.0.113.9:0").ip());
        // Every hop trusted: the left-most.
        let h = headers("x-forwarded-for", &["10.9.9.9, 10.0.0.7"]);
        assert_eq!(p.client(via_proxy, &h).ip(), addr("10.9.9.9:0").ip());
        // No header, or a hop that does not parse: the proxy.
        assert_eq!(p.client(via_proxy, &HeaderMap::new()), via_proxy);
        let h = headers("x-forwarded-for", &["203.0.113.9, garbage"]);
        assert_eq!(p.client(via_proxy, &h), via_proxy);
        // IPv6, bracketed, with ports; mapped IPv4 counts as IPv4.
        let h = headers("x-forwarded-for", &["[2001:db8::1]:4711"]);
        assert_eq!(p.client(via_proxy, &h), addr("[2001:db8::1]:4711"));
        let h = headers("x-forwarded-for", &["::ffff:203.0.113.9"]);
        assert_eq!(p.client(via_proxy, &h).ip(), addr("203.0.113.9:0").ip());
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_says() {
        let p = proxies(AddressHeader::XForwardedFor);
        let direct = addr("203.0.113.5:6000");
        let h = headers("x-forwarded-for", &["1.2.3.4"]);
        assert_eq!(p.client(direct, &h), direct);
        // Nor does a header of the other kind count.
        let p = proxies(AddressHeader::Forwarded);
        let h = headers("x-forwarded-for", &["1.2.3.4"]);
        assert_eq!(p.client(addr("10.0.0.1:1"), &h), addr("10.0.0.1:1"));
    }

    #[test]
    fn forwarded_names_clients_with_for() {
        let p = proxies(AddressHeader::Forwarded);
        let via = addr("10.0.0.1:1");
        let h = headers(
            "forwarded",
            &[
                r#"for=6.6.6.6, For="[2001:db8:cafe::17]:4711";proto=https, for=10.0.0.8;by=10.0.0.1"#,
            ],
        );
        assert_eq!(p.client(via, &h), addr("[2001:db8:cafe::17]:4711"));
        let h = headers("forwarded", &["for=unknown"]);
        assert_eq!(p.client(via, &h), via);
        let h = headers("forwarded", &["for=_hidden, for=203.0.113.1"]);
        assert_eq!(p.client(via, &h).ip(), addr("203.0.113.1:0").ip());
    }

    #[test]
    fn proxy_headers_v1_and_v2() {
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 8080\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse_header(v1),
            Parsed::Complete(44, Preamble::Client(addr("203.0.113.7:51000")))
        );
        assert_eq!(
            parse_header(b"PROXY UNKNOWN\r\n"),
            Parsed::Complete(15, Preamble::Local)
        );
        assert_eq!(parse_header(b"PROXY TCP4 203.0"), Parsed::Incomplete);
        assert_eq!(parse_header(b"GET / HTTP/1.1\r\n\r\n"), Parsed::Invalid);
        let mut v2 = V2_SIGNATURE.to_vec();
        // PROXY over TCP/IPv4, 12 bytes of addresses: 203.0.113.7:51000 -> 10.0.0.1:8080.
        v2.extend([
            0x21, 0x11, 0, 12, 203, 0, 113, 7, 10, 0, 0, 1, 0xc7, 0x38, 0x1f, 0x90,
        ]);
        v2.extend(b"GET");
        assert_eq!(
            parse_header(&v2),
            Parsed::Complete(28, Preamble::Client(addr("203.0.113.7:51000")))
        );
        assert_eq!(parse_header(&v2[..20]), Parsed::Incomplete);
        let mut local = V2_SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        assert_eq!(parse_header(&local), Parsed::Complete(16, Preamble::Local));
        assert!(looks_like_header(b"PROX"));
        assert!(looks_like_header(&v2[..5]));
        assert!(!looks_like_header(b"GET /"));
        assert!(!looks_like_header(b""));
    }

    #[test]
    fn fuzz_proxy_headers() {
        use proptest::prelude::*;
        crate::fuzz::replay("proxy_header", check_proxy_header);
        let mut runner = proptest::test_runner::TestRunner::new(crate::fuzz::config());
        let octet = || 0u8..=255;
        let v1 = (
            prop_oneof![
                Just("TCP4".to_owned()),
                Just("TCP6".to_owned()),
                Just("UNKNOWN".to_owned()),
                "[A-Z0-9]{0,5}",
            ],
            "[0-9a-f.:]{0,40}",
            "[0-9a-f.:]{0,40}",
            any::<u16>(),
            any::<u16>(),
        )
            .prop_map(|(proto, a, b, p, q)| {
                format!("PROXY {proto} {a} {b} {p} {q}\r\nGET").into_bytes()
            });
        let v2 = (
            octet(),
            octet(),
            any::<u16>(),
            proptest::collection::vec(octet(), 0..64),
        )
            .prop_map(|(ver_cmd, family, len, rest)| {
                let mut bytes = V2_SIGNATURE.to_vec();
                bytes.extend([ver_cmd, family]);
                bytes.extend(len.to_be_bytes());
                bytes.extend(rest);
                bytes
            });
        let hops = proptest::collection::vec(
            prop_oneof![
                "(10|127|203)\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}",
                "for=\"?\\[?[0-9a-f:.]{0,20}\\]?(:[0-9]{1,5})?\"?",
                "[ -~]{0,12}",
            ],
            0..5,
        )
        .prop_map(|hops| hops.join(", ").into_bytes());
        runner
            .run(&prop_oneof![any::<Vec<u8>>(), v1, v2, hops], |input| {
                check_proxy_header(&input);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn trusted_entries_parse() {
        assert!(parse_trusted(&["10.0.0.0/8".into(), "::1".into(), "fd00::/8".into()]).is_ok());
        assert!(parse_trusted(&["10.0.0.0/33".into()]).is_err());
        assert!(parse_trusted(&["example.com".into()]).is_err());
        let p = Proxies::new(
            parse_trusted(&["127.0.0.1".into()]).unwrap(),
            AddressHeader::XForwardedFor,
            true,
        );
        assert!(p.trusts("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!p.trusts("127.0.0.2".parse().unwrap()));
    }
}
