//! Health probes that take the tunnel path: a TCP SYN from this host to
//! the VIP's service port, encapsulated toward the backend exactly as the
//! balancer encapsulates client packets (IP-in-IP or GUE, either family),
//! sent on a raw socket. Only the backend's decapsulation can turn it into
//! a SYN its kernel accepts, and only a kernel with the VIP on `lo` answers
//! it, from the VIP, back to this host: a SYN-ACK seen here proves the
//! decap program, the VIP on `lo`, rp_filter and the way back all work, as
//! a dead server process is caught by the service probe. The half-open
//! connection is closed with an RST through the same tunnel.

use std::{
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use lb_common::{
    PROTO_TCP,
    maps::Addr,
    model::{ModelParse, Outer, checksum_with, encapsulate, ipv6_pseudo_sum, parse},
    user::addr_from_ip,
};
use tokio::io::unix::AsyncFd;

use crate::health::{Failure, Probe, is_local_error};

/// How a VIP's packets reach one backend (from the config).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelSpec {
    pub vip: IpAddr,
    /// The TCP port probed on the VIP.
    pub port: u16,
    pub backend: IpAddr,
    pub gue: bool,
    /// GUE destination port, host order.
    pub gue_port: u16,
    /// Outer source addresses, as the data path's (`encap_source_prefix`).
    pub outer_src4: IpAddr,
    pub outer_src6: IpAddr,
}

pub(crate) const SYN: u8 = 0x02;
pub(crate) const RST: u8 = 0x04;
pub(crate) const ACK: u8 = 0x10;

fn probe_error(e: &io::Error) -> Probe {
    if is_local_error(e) {
        Probe::Local(e.raw_os_error().unwrap_or(0))
    } else {
        Probe::Down(Failure::Tunnel)
    }
}

fn local(e: io::Error) -> Probe {
    Probe::Local(e.raw_os_error().unwrap_or(libc::EIO))
}

/// The address this host sends from toward `to` (no packet is sent).
pub(crate) fn source_toward(to: IpAddr, port: u16) -> io::Result<IpAddr> {
    let bind: SocketAddr = if to.is_ipv6() {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    let s = UdpSocket::bind(bind)?;
    s.connect(SocketAddr::new(to, port))?;
    Ok(s.local_addr()?.ip())
}

pub(crate) fn raw_socket(family: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A TCP segment (header only, 20 bytes) with a valid checksum.
pub(crate) fn tcp_segment(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    seq: u32,
    flags: u8,
) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    write_tcp_header(&mut t, (src, dst), sport, dport, seq, flags);
    t
}

/// Writes a 20-byte TCP header with its checksum into `t` (zeroed).
pub(crate) fn write_tcp_header(
    t: &mut [u8],
    (src, dst): (IpAddr, IpAddr),
    sport: u16,
    dport: u16,
    seq: u32,
    flags: u8,
) {
    let t = &mut t[..20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&(if flags & RST != 0 { 0u16 } else { 64_240 }).to_be_bytes());
    let pseudo = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let (s, d) = (s.octets(), d.octets());
            let mut sum = 0u32;
            for c in s.chunks(2).chain(d.chunks(2)) {
                sum += u16::from_be_bytes([c[0], c[1]]) as u32;
            }
            sum + PROTO_TCP as u32 + 20
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_pseudo_sum(&s.octets(), &d.octets(), 20, PROTO_TCP),
        _ => unreachable!("one family"),
    };
    let check = checksum_with(pseudo, t);
    t[16..18].copy_from_slice(&check.to_be_bytes());
}

/// Writes an IP header for a TCP payload of `payload` bytes into `ip`
/// (zeroed, room for either family's); its length.
pub(crate) fn write_ip_header(ip: &mut [u8], src: IpAddr, dst: IpAddr, payload: usize) -> usize {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ip = &mut ip[..20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 64;
            ip[9] = PROTO_TCP;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let check = checksum_with(0, ip);
            ip[10..12].copy_from_slice(&check.to_be_bytes());
            20
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ip = &mut ip[..40];
            ip[0..4].copy_from_slice(&(6u32 << 28).to_be_bytes());
            ip[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
            ip[6] = PROTO_TCP;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            40
        }
        _ => unreachable!("one family"),
    }
}

/// An Ethernet frame (MACs unused) around an IP packet carrying `tcp`.
pub(crate) fn frame(src: IpAddr, dst: IpAddr, tcp: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 40 + tcp.len()];
    let ethertype: u16 = if dst.is_ipv6() { 0x86DD } else { 0x0800 };
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    let ip = write_ip_header(&mut f[14..], src, dst, tcp.len());
    f[14 + ip..14 + ip + tcp.len()].copy_from_slice(tcp);
    f.truncate(14 + ip + tcp.len());
    f
}

/// The packet the balancer would send the backend for `inner` (an
/// Ethernet frame): outer IP (+ GUE) + inner IP packet.
pub fn encapsulated(spec: &TunnelSpec, inner: &[u8], hash: u32) -> Vec<u8> {
    let ModelParse::Ip(p) = parse(inner) else {
        unreachable!("built here")
    };
    let v6 = spec.backend.is_ipv6();
    let src: Addr = addr_from_ip(if v6 { spec.outer_src6 } else { spec.outer_src4 });
    let outer = Outer {
        v6,
        gue: spec.gue,
        src,
        dst: addr_from_ip(spec.backend),
        ttl: 64,
        hash,
        gue_port: spec.gue_port.to_be(),
    };
    encapsulate(inner, &p, &outer, [0; 6], [0; 6])[14..].to_vec()
}

/// A raw socket that sends whole IP packets (IPPROTO_RAW: the packet
/// carries its own header, both families) toward `spec.backend`.
fn sender(spec: &TunnelSpec) -> io::Result<OwnedFd> {
    let family = if spec.backend.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    raw_socket(family, libc::IPPROTO_RAW)
}

fn send_raw(fd: &OwnedFd, spec: &TunnelSpec, packet: &[u8]) -> io::Result<()> {
    send_ip(fd, spec.backend, packet)
}

/// Sends a whole IP packet (its own header) toward `to` on a raw socket.
pub(crate) fn send_ip(fd: &OwnedFd, to: IpAddr, packet: &[u8]) -> io::Result<()> {
    let (storage, len) = sockaddr(&SocketAddr::new(to, 0));
    // SAFETY: buffer and address are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// One datagram of a raw socket into `buf`: its length (at most `buf`'s)
/// and the sender (`None`: neither IPv4 nor IPv6).
pub(crate) fn recv_raw(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<(usize, Option<IpAddr>)> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut from_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: buffers valid for the lengths given.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC,
            (&mut from as *mut libc::sockaddr_storage).cast(),
            &mut from_len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(((n as usize).min(buf.len()), ip_of(&from)))
}

/// The address in a sockaddr the kernel filled (`None`: neither family).
pub(crate) fn ip_of(from: &libc::sockaddr_storage) -> Option<IpAddr> {
    match from.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in.
            let sin =
                unsafe { &*(from as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6.
            let sin6 =
                unsafe { &*(from as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(IpAddr::from(sin6.sin6_addr.s6_addr))
        }
        _ => None,
    }
}

/// What came back for our SYN: the answer's (flags, sequence number), if
/// `buf` (as a raw TCP socket of the VIP's family delivers it: with the
/// IPv4 header, without the IPv6 one) is a segment from the VIP's port to
/// ours.
fn answer(buf: &[u8], from: IpAddr, spec: &TunnelSpec, our_port: u16) -> Option<(u8, u32)> {
    let tcp = if spec.vip.is_ipv6() {
        buf
    } else {
        let ihl = (*buf.first()? & 0x0F) as usize * 4;
        buf.get(ihl..)?
    };
    if tcp.len() < 20 || from != spec.vip {
        return None;
    }
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    if sport != spec.port || dport != our_port {
        return None;
    }
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    Some((tcp[13], ack))
}

/// Receives on the raw TCP socket until an answer to `our_port` arrives or
/// `deadline` passes.
async fn await_answer(
    fd: &AsyncFd<OwnedFd>,
    spec: &TunnelSpec,
    our_port: u16,
    deadline: Instant,
) -> Option<(u8, u32)> {
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let mut guard = tokio::time::timeout(left, fd.readable()).await.ok()?.ok()?;
        let (n, from_ip) = match recv_raw(fd.get_ref(), &mut buf) {
            Ok((n, Some(ip))) => (n, ip),
            Ok(_) => continue,
            Err(e) => {
                if e.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                }
                continue;
            }
        };
        if let Some(a) = answer(&buf[..n], from_ip, spec, our_port) {
            return Some(a);
        }
    }
}

/// One probe through the tunnel: `Up` on a SYN-ACK from the VIP, `Down` on
/// an RST or silence, `Local` when this host cannot send one (no
/// CAP_NET_RAW, no route, no descriptors).
pub async fn probe_tunnel(spec: &TunnelSpec, timeout: Duration) -> Probe {
    let deadline = Instant::now() + timeout;
    let ours = match source_toward(spec.vip, spec.port) {
        Ok(ip) => ip,
        Err(e) => return probe_error(&e),
    };
    // A port of our own for the probe: a bound TCP socket keeps any other
    // connection from taking it meanwhile (the kernel answers the SYN-ACK
    // with an RST too, which is fine).
    let reserved = if ours.is_ipv6() {
        tokio::net::TcpSocket::new_v6()
    } else {
        tokio::net::TcpSocket::new_v4()
    }
    .and_then(|s| s.bind(SocketAddr::new(ours, 0)).map(|_| s))
    .and_then(|s| s.local_addr().map(|a| (s, a.port())));
    let (reservation, our_port) = match reserved {
        Ok(r) => r,
        Err(e) => return probe_error(&e),
    };
    let family = if spec.vip.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    let rx = match raw_socket(family, libc::IPPROTO_TCP) {
        // SAFETY: an OwnedFd keeps its one descriptor until dropped.
        Ok(fd) => match unsafe { AsyncFd::register(fd) } {
            Ok(fd) => fd,
            Err(e) => return local(e.into()),
        },
        Err(e) => return local(e),
    };
    let tx = match sender(spec) {
        Ok(fd) => fd,
        Err(e) => return probe_error(&e),
    };
    let seq: u32 = rand_u32();
    let syn = frame(
        ours,
        spec.vip,
        &tcp_segment(ours, spec.vip, our_port, spec.port, seq, SYN),
    );
    if let Err(e) = send_raw(&tx, spec, &encapsulated(spec, &syn, seq)) {
        return probe_error(&e);
    }
    let verdict = match await_answer(&rx, spec, our_port, deadline).await {
        Some((flags, ack)) if flags & (SYN | ACK) == SYN | ACK => {
            // Close the half-open connection where it is.
            let rst = frame(
                ours,
                spec.vip,
                &tcp_segment(ours, spec.vip, our_port, spec.port, ack, RST),
            );
            let _ = send_raw(&tx, spec, &encapsulated(spec, &rst, seq));
            Probe::Up
        }
        _ => Probe::Down(Failure::Tunnel),
    };
    drop(reservation);
    verdict
}

/// A random 32-bit number (sequence numbers, outer flow hash).
pub(crate) fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom into a local buffer.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    u32::from_ne_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(vip: &str, backend: &str, gue: bool) -> TunnelSpec {
        TunnelSpec {
            vip: vip.parse().unwrap(),
            port: 80,
            backend: backend.parse().unwrap(),
            gue,
            gue_port: 6080,
            outer_src4: "172.16.0.1".parse().unwrap(),
            outer_src6: "fd00:172:16::1".parse().unwrap(),
        }
    }

    #[test]
    fn the_probe_is_what_the_balancer_would_send() {
        let s = spec("10.0.0.10", "10.30.1.2", false);
        let ours: IpAddr = "10.20.1.2".parse().unwrap();
        let tcp = tcp_segment(ours, s.vip, 40_000, 80, 7, SYN);
        let syn = frame(ours, s.vip, &tcp);
        let p = encapsulated(&s, &syn, 7);
        assert_eq!(p.len(), 20 + 20 + 20);
        assert_eq!(p[9], 4, "IPIP");
        assert_eq!(&p[16..20], &[10, 30, 1, 2], "to the backend");
        assert_eq!(&p[20 + 12..20 + 16], &[10, 20, 1, 2], "from this host");
        assert_eq!(&p[20 + 16..20 + 20], &[10, 0, 0, 10], "to the VIP");
        // The inner TCP checksum verifies.
        let ModelParse::Ip(inner) = parse(&syn) else {
            panic!()
        };
        assert_eq!(inner.tcp_flags, SYN);
        let mut sum = 0u32;
        for c in [10u8, 20, 1, 2, 10, 0, 0, 10].chunks(2) {
            sum += u16::from_be_bytes([c[0], c[1]]) as u32;
        }
        assert_eq!(checksum_with(sum + 6 + 20, &tcp), 0);
        // GUE over IPv6 for an IPv6 VIP.
        let s6 = spec("fd00::10", "fd00:30:1::2", true);
        let ours6: IpAddr = "fd00:20:1::2".parse().unwrap();
        let syn6 = frame(
            ours6,
            s6.vip,
            &tcp_segment(ours6, s6.vip, 40_000, 80, 7, SYN),
        );
        let p6 = encapsulated(&s6, &syn6, 7);
        assert_eq!(p6[6], 17, "UDP");
        assert_eq!(u16::from_be_bytes([p6[42], p6[43]]), 6080, "GUE port");
        assert_eq!(p6[48] >> 4, 6, "inner IPv6");
    }

    #[test]
    fn only_the_vips_answer_to_our_port_counts() {
        let s = spec("10.0.0.10", "10.30.1.2", false);
        let vip = s.vip;
        let mut seg = vec![0x45u8];
        seg.resize(20, 0);
        seg.extend_from_slice(&tcp_segment(
            vip,
            "10.20.1.2".parse().unwrap(),
            80,
            40_000,
            9,
            SYN | ACK,
        ));
        assert_eq!(answer(&seg, vip, &s, 40_000).map(|a| a.0), Some(SYN | ACK));
        assert_eq!(answer(&seg, vip, &s, 40_001), None, "another probe's");
        assert_eq!(answer(&seg, "10.0.0.11".parse().unwrap(), &s, 40_000), None);
        assert_eq!(answer(&seg[..30], vip, &s, 40_000), None, "cut short");
    }
}
