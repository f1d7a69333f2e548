//! Half-open TCP health probes (`[vip.health] kind = "syn"`): a SYN sent on
//! one raw socket shared by every probe, the answer read on one raw TCP
//! socket per family. A SYN-ACK is up (this host's kernel resets it: the
//! source port is bound by a socket that never connects), an RST down,
//! silence a timeout. Per probe: one `sendto`, one segment received, no
//! socket, no handshake, no accept on the backend. What `kind = "tcp"`
//! costs (a socket, a full handshake and a reset per probe) is about four
//! times as much on this host; at 10,000 backends that is most of lbd's CPU.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use tokio::{io::unix::AsyncFd, sync::oneshot};

use crate::{
    health::{Failure, Probe, is_local_error, probe_tcp},
    tunnel_probe::{
        ACK, RST, SYN, frame, rand_u32, raw_socket, recv_raw, send_ip, source_toward, tcp_segment,
    },
};

/// A probe waiting for its answer: (backend, backend port, our port), and
/// the ack number an answer to its SYN carries.
type Waiting = Arc<Mutex<HashMap<(IpAddr, u16, u16), (u32, oneshot::Sender<u8>)>>>;

/// Source ports per family. Two probes in flight on the same 4-tuple would
/// look like one SYN retransmitted to the backend; a probe finds a free
/// port of the pool for its backend, else connects instead.
const PORTS: usize = 8;

/// One address family's sockets.
struct Family {
    /// IPPROTO_RAW: whole IP packets out.
    tx: OwnedFd,
    /// The source ports probes use, each kept by a bound TCP socket (no
    /// other socket gets it; the kernel resets the SYN-ACKs that reach it).
    ports: Vec<u16>,
    _reservations: Vec<tokio::net::TcpSocket>,
}

pub struct SynProber {
    v4: Option<Family>,
    v6: Option<Family>,
    waiting: Waiting,
    /// Source address toward each backend (a routing decision), looked up
    /// once a minute at most.
    sources: Mutex<HashMap<IpAddr, (IpAddr, Instant)>>,
}

const SOURCE_TTL: Duration = Duration::from_secs(60);

/// A bound TCP socket on a free port (never listening, never connected):
/// the port is ours, and the kernel resets the SYN-ACKs that reach it.
fn reserve_port(v6: bool) -> io::Result<(tokio::net::TcpSocket, u16)> {
    let s = if v6 {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    let any: SocketAddr = if v6 { "[::]:0" } else { "0.0.0.0:0" }.parse().unwrap();
    s.bind(any)?;
    let port = s.local_addr()?.port();
    Ok((s, port))
}

impl SynProber {
    /// Opens the sockets and starts the receivers (needs CAP_NET_RAW).
    fn open() -> io::Result<SynProber> {
        let waiting: Waiting = Arc::default();
        let mut families = [None, None];
        for (i, v6) in [false, true].into_iter().enumerate() {
            let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
            // An IPv6-less host still probes IPv4 backends.
            let Ok(tx) = raw_socket(family, libc::IPPROTO_RAW) else {
                continue;
            };
            let (reservations, ports): (Vec<_>, Vec<_>) = (0..PORTS)
                .map(|_| reserve_port(v6))
                .collect::<io::Result<Vec<_>>>()?
                .into_iter()
                .unzip();
            let rx = raw_socket(family, libc::IPPROTO_TCP)?;
            only_answers(&rx, v6)?;
            // SAFETY: an OwnedFd keeps its one descriptor until dropped.
            let rx = unsafe { AsyncFd::register(rx) }?;
            tokio::spawn(receive(rx, ports.clone(), waiting.clone()));
            families[i] = Some(Family {
                tx,
                ports,
                _reservations: reservations,
            });
        }
        let [v4, v6] = families;
        if v4.is_none() && v6.is_none() {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(SynProber {
            v4,
            v6,
            waiting,
            sources: Mutex::default(),
        })
    }

    fn source(&self, to: IpAddr, port: u16) -> io::Result<IpAddr> {
        let now = Instant::now();
        if let Some((ip, at)) = self.sources.lock().unwrap().get(&to)
            && now.duration_since(*at) < SOURCE_TTL
        {
            return Ok(*ip);
        }
        let ip = source_toward(to, port)?;
        self.sources.lock().unwrap().insert(to, (ip, now));
        Ok(ip)
    }

    async fn probe(&self, addr: IpAddr, port: u16, timeout: Duration) -> Probe {
        let Some(f) = (if addr.is_ipv6() { &self.v6 } else { &self.v4 }) else {
            return Probe::Local(libc::EAFNOSUPPORT);
        };
        let ours = match self.source(addr, port) {
            Ok(ip) => ip,
            Err(e) => return local_or_down(&e),
        };
        let seq = rand_u32();
        let (tx, rx) = oneshot::channel();
        let free = {
            let mut waiting = self.waiting.lock().unwrap();
            let free = f
                .ports
                .iter()
                .find(|&&p| !waiting.contains_key(&(addr, port, p)))
                .map(|&p| (addr, port, p));
            if let Some(key) = free {
                waiting.insert(key, (seq.wrapping_add(1), tx));
            }
            free
        };
        let Some(key) = free else {
            return probe_tcp(addr, port, timeout).await;
        };
        let syn = frame(ours, addr, &tcp_segment(ours, addr, key.2, port, seq, SYN));
        if let Err(e) = send_ip(&f.tx, addr, &syn[14..]) {
            self.waiting.lock().unwrap().remove(&key);
            return local_or_down(&e);
        }
        let answer = tokio::time::timeout(timeout, rx).await;
        self.waiting.lock().unwrap().remove(&key);
        match answer {
            Ok(Ok(flags)) if flags & (SYN | ACK) == SYN | ACK => Probe::Up,
            Ok(Ok(_)) => Probe::Down(Failure::Connect),
            _ => Probe::Down(Failure::Timeout),
        }
    }
}

/// Keeps only SYN-ACKs and resets with ACK on `fd` (a raw TCP socket sees
/// every segment this host receives: our own SYNs over `lo`, the resets
/// our kernel sends, all other TCP), and gives it room for bursts.
fn only_answers(fd: &OwnedFd, v6: bool) -> io::Result<()> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    // IPv4 sockets see the IP header first; IPv6 ones the segment alone.
    let load_flags = if v6 {
        vec![op(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 13)]
    } else {
        vec![
            // X = the IPv4 header's length.
            op(libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH, 0, 0, 0),
            op(libc::BPF_LD | libc::BPF_B | libc::BPF_IND, 0, 0, 13),
        ]
    };
    let mut prog = load_flags;
    prog.extend([
        // ACK set, and SYN or RST: else drop.
        op(
            libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K,
            0,
            2,
            ACK as u32,
        ),
        op(
            libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K,
            0,
            1,
            (SYN | RST) as u32,
        ),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, 0xffff),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
    ]);
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    let set = |name, value: *const libc::c_void, len: usize| {
        // SAFETY: `value` points at `len` valid bytes for this option.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                value,
                len as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    set(
        libc::SO_ATTACH_FILTER,
        (&fprog as *const libc::sock_fprog).cast(),
        std::mem::size_of::<libc::sock_fprog>(),
    )?;
    // Thousands of answers a second: a few MB, not the default ~200 KB.
    let bytes: libc::c_int = 4 << 20;
    let size = std::mem::size_of::<libc::c_int>();
    let ptr = (&bytes as *const libc::c_int).cast();
    set(libc::SO_RCVBUFFORCE, ptr, size).or_else(|_| set(libc::SO_RCVBUF, ptr, size))
}

fn local_or_down(e: &io::Error) -> Probe {
    if is_local_error(e) {
        Probe::Local(e.raw_os_error().unwrap_or(0))
    } else {
        Probe::Down(Failure::Connect)
    }
}

/// The (backend, backend port, our port, ack number, flags) of a segment
/// to one of `ports`, as a raw TCP socket delivers it (IPv4: with its IP
/// header; IPv6: the segment alone, the source in `from`).
fn answer_of(buf: &[u8], from: IpAddr, ports: &[u16]) -> Option<(IpAddr, u16, u16, u32, u8)> {
    let tcp = if from.is_ipv6() {
        buf
    } else {
        let ihl = (*buf.first()? & 0x0F) as usize * 4;
        buf.get(ihl..)?
    };
    if tcp.len() < 20 {
        return None;
    }
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    if !ports.contains(&dport) {
        return None;
    }
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let flags = tcp[13];
    // Answers to a SYN: SYN-ACK, or RST (with ACK) from a closed port.
    (flags & ACK != 0 && flags & (SYN | RST) != 0).then_some((from, sport, dport, ack, flags))
}

/// Reads every TCP segment this host receives and hands answers to our
/// port to the probe waiting for them.
async fn receive(rx: AsyncFd<OwnedFd>, ports: Vec<u16>, waiting: Waiting) {
    let mut buf = [0u8; 128];
    loop {
        let Ok(mut guard) = rx.readable().await else {
            return;
        };
        loop {
            let (len, from_ip) = match recv_raw(rx.get_ref(), &mut buf) {
                Ok((len, Some(ip))) => (len, ip),
                Ok(_) => continue,
                Err(_) => {
                    guard.clear_ready();
                    break;
                }
            };
            let Some((addr, sport, dport, ack, flags)) = answer_of(&buf[..len], from_ip, &ports)
            else {
                continue;
            };
            let mut waiting = waiting.lock().unwrap();
            let key = (addr, sport, dport);
            // Only the answer to this probe's SYN (a late one to an earlier
            // probe carries another ack number).
            if waiting.get(&key).is_some_and(|(want, _)| *want == ack)
                && let Some((_, tx)) = waiting.remove(&key)
            {
                let _ = tx.send(flags);
            }
        }
    }
}

static PROBER: OnceLock<Option<SynProber>> = OnceLock::new();

/// One half-open probe of `addr:port`; a plain connect where raw sockets
/// are not allowed (no CAP_NET_RAW: logged once by the caller's counters).
pub async fn probe_syn(addr: IpAddr, port: u16, timeout: Duration) -> Probe {
    let prober = PROBER.get_or_init(|| match SynProber::open() {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!("half-open health probes need raw sockets (CAP_NET_RAW): {e}; probing with connects instead");
            None
        }
    });
    match prober {
        Some(p) => p.probe(addr, port, timeout).await,
        None => probe_tcp(addr, port, timeout).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_to_our_port_count() {
        let from: IpAddr = "10.30.1.2".parse().unwrap();
        let mut ip = vec![0x45u8; 1];
        ip.resize(20, 0);
        let segment = |dport: u16, flags: u8| {
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(&80u16.to_be_bytes());
            t[2..4].copy_from_slice(&dport.to_be_bytes());
            t[8..12].copy_from_slice(&1001u32.to_be_bytes());
            t[13] = flags;
            [ip.clone(), t].concat()
        };
        let ours = [40000, 40002];
        assert_eq!(
            answer_of(&segment(40000, SYN | ACK), from, &ours),
            Some((from, 80, 40000, 1001, SYN | ACK))
        );
        assert_eq!(
            answer_of(&segment(40002, RST | ACK), from, &ours),
            Some((from, 80, 40002, 1001, RST | ACK))
        );
        assert_eq!(answer_of(&segment(40001, SYN | ACK), from, &ours), None);
        // Data or a bare ACK to the port is no answer to a SYN.
        assert_eq!(answer_of(&segment(40000, ACK), from, &ours), None);
        assert_eq!(answer_of(&[0x45, 0, 0], from, &ours), None);
    }
}
