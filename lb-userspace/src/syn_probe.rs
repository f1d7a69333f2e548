//! Half-open TCP health probes (`[vip.health] kind = "syn"`): a SYN sent on
//! a raw socket, the answer read from a receive ring (`answer_ring`; a raw
//! TCP socket per family where the ring cannot be had). A SYN-ACK is up
//! (this host's kernel resets it: the source port is bound by a socket
//! that never connects), an RST down, silence a timeout. No socket, no
//! handshake, no accept on the backend.
//!
//! One thread runs every half-open probe of the process. Every 10 ms it
//! reads the answers waiting in the ring, times out the probes whose time
//! is up, and sends the SYNs now due (`sendmmsg`, a batch per call). There
//! is no task, timer, channel or system call per probe: with a task and a
//! timeout per probe, 10,000 backends a second took 16% of a core, most of
//! it that machinery. Per probe what is left is the kernel's work for one
//! SYN out and one answer in, and a few cache misses on the probe's state
//! (kept compact for that: slots, a timing wheel, subscribers in one list).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot};

use crate::{
    answer_ring::{AnswerRing, set_option},
    health::{Failure, Probe, is_local_error, probe_tcp},
    tunnel_probe::{
        ACK, RST, SYN, ip_of, rand_u32, raw_socket, sockaddr, source_toward, write_ip_header,
        write_tcp_header,
    },
};

/// Where a probe's outcome goes; called on the probing thread, so it must
/// be quick (hand slow work to a runtime).
pub type Sink = Box<dyn FnMut(Probe) + Send>;

/// How often the probing thread wakes: a probe goes out up to this late,
/// and a timeout is declared up to this late (never early).
const TICK: Duration = Duration::from_millis(10);

/// Segments read per `recvmmsg`.
const RECV_BATCH: usize = 64;

/// Messages per `sendmmsg` (the kernel's UIO_MAXIOV).
const SEND_BATCH: usize = 1024;

/// Source ports per family. Two probes in flight on the same 4-tuple would
/// look like one SYN retransmitted to the backend; a probe takes a port of
/// the pool that is free toward its backend, else connects instead.
const PORTS: usize = 8;

/// The source address toward a backend (a routing decision) is looked up
/// again after this long.
const SOURCE_TTL: Duration = Duration::from_secs(60);

/// A probed (backend, port), once or every `every`.
struct Target {
    /// Its registration's id.
    id: u64,
    addr: IpAddr,
    port: u16,
    every: Option<Duration>,
    timeout: Duration,
    /// When its next SYN goes out, and the tick it is filed under.
    due: Instant,
    due_tick: u64,
    sink: Sink,
    flight: Option<Flight>,
}

/// A probe sent and not yet answered.
struct Flight {
    /// (backend, backend port, our port); `None`: a connect is under way
    /// instead (no free source port).
    key: Option<(IpAddr, u16, u16)>,
    /// The ack number an answer to this SYN carries.
    ack: u32,
    /// The tick its timeout is filed under.
    deadline_tick: u64,
}

/// The targets by slot: a vector, not a hash map, since the probing
/// thread reaches each once a round from a cold cache; ids (which
/// registrations hold) map to slots only when targets come and go.
#[derive(Default)]
struct Targets {
    slots: Vec<Option<Target>>,
    free: Vec<usize>,
    by_id: FxHashMap<u64, u64>,
}

impl Targets {
    fn insert(&mut self, target: Target) -> u64 {
        let id = target.id;
        let slot = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(target);
                i
            }
            None => {
                self.slots.push(Some(target));
                self.slots.len() - 1
            }
        } as u64;
        self.by_id.insert(id, slot);
        slot
    }

    fn slot_of(&self, id: u64) -> Option<u64> {
        self.by_id.get(&id).copied()
    }

    fn get(&self, slot: u64) -> Option<&Target> {
        self.slots.get(slot as usize)?.as_ref()
    }

    fn get_mut(&mut self, slot: u64) -> Option<&mut Target> {
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    fn remove(&mut self, slot: u64) -> Option<Target> {
        let t = self.slots.get_mut(slot as usize)?.take()?;
        self.by_id.remove(&t.id);
        self.free.push(slot as usize);
        Some(t)
    }

    fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Targets filed by the tick they are due in: filing and taking are O(1)
/// whatever the number of targets (an ordered set cost more than the
/// rest of a probe's bookkeeping). A filed id may be stale (its target
/// removed or filed again): takers check it against the target.
struct Wheel {
    epoch: Instant,
    buckets: FxHashMap<u64, Vec<u64>>,
    /// Every tick up to this one has been taken.
    done: u64,
}

impl Wheel {
    fn new(epoch: Instant) -> Wheel {
        Wheel {
            epoch,
            buckets: FxHashMap::default(),
            done: 0,
        }
    }

    /// Files `id` under the first tick that starts at or after `at` (never
    /// early), at the earliest the next one to be taken.
    fn file(&mut self, at: Instant, id: u64) -> u64 {
        let since = at.saturating_duration_since(self.epoch).as_nanos();
        let tick = (since.div_ceil(TICK.as_nanos()) as u64).max(self.done + 1);
        self.buckets.entry(tick).or_default().push(id);
        tick
    }

    /// Every (tick, id) filed under a tick that has begun by `now`.
    fn take(&mut self, now: Instant) -> Vec<(u64, u64)> {
        let now_tick =
            (now.saturating_duration_since(self.epoch).as_nanos() / TICK.as_nanos()) as u64;
        let mut ticks: Vec<u64> =
            if now_tick.saturating_sub(self.done) as usize > self.buckets.len() {
                // Long asleep: fewer buckets than ticks missed.
                self.buckets
                    .keys()
                    .copied()
                    .filter(|&t| t <= now_tick)
                    .collect()
            } else {
                (self.done + 1..=now_tick).collect()
            };
        ticks.sort_unstable();
        self.done = self.done.max(now_tick);
        ticks
            .into_iter()
            .flat_map(|t| {
                self.buckets
                    .remove(&t)
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |id| (t, id))
            })
            .collect()
    }
}

enum Command {
    Add(Target),
    Remove(u64),
    /// What a connect made instead of a SYN found.
    Connected(u64, Probe),
}

/// One address family's sockets.
struct Family {
    /// IPPROTO_RAW: whole IP packets out.
    tx: OwnedFd,
    /// Raw TCP: answers in (filtered by `only_answers`), where the
    /// answer ring cannot be had.
    rx: Option<OwnedFd>,
    /// The source ports probes use, each kept by a bound TCP socket (no
    /// other socket gets it; the kernel resets the SYN-ACKs that reach it).
    ports: Vec<u16>,
    _reservations: Vec<tokio::net::TcpSocket>,
}

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

impl Family {
    /// Answers on a raw TCP socket (no answer ring).
    fn receive_raw(&mut self, v6: bool) -> io::Result<()> {
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        let rx = raw_socket(family, libc::IPPROTO_TCP)?;
        only_answers(&rx, v6)?;
        self.rx = Some(rx);
        Ok(())
    }

    fn open(v6: bool) -> io::Result<Family> {
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        let tx = raw_socket(family, libc::IPPROTO_RAW)?;
        let (reservations, ports): (Vec<_>, Vec<_>) = (0..PORTS)
            .map(|_| reserve_port(v6))
            .collect::<io::Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        Ok(Family {
            tx,
            rx: None,
            ports,
            _reservations: reservations,
        })
    }
}

/// Everything the probing thread owns.
struct SynProber {
    v4: Option<Family>,
    v6: Option<Family>,
    /// Where answers are read (else on each family's raw socket).
    ring: Option<AnswerRing>,
    /// Both families' probe ports (the ring holds answers of either).
    ports: Vec<u16>,
    targets: Targets,
    /// The targets by when their next SYN goes.
    due: Wheel,
    /// The SYNs in flight by when they time out.
    deadlines: Wheel,
    /// The slot of the target a SYN in flight belongs to, by its 4-tuple.
    waiting: FxHashMap<(IpAddr, u16, u16), u64>,
    sources: FxHashMap<IpAddr, (IpAddr, Instant)>,
    /// Initial sequence numbers (xorshift: unpredictable enough, and an
    /// answer must also come from the probed address and port).
    seq: u64,
    /// For the connects made instead of a SYN to report back.
    commands: mpsc::UnboundedSender<Command>,
}

/// A SYN ready to go: its target's slot, 4-tuple, expected ack, and the
/// IP packet (a header of either family and 20 bytes of TCP) with its
/// length.
type Outgoing = (u64, (IpAddr, u16, u16), u32, ([u8; 60], usize));

/// An answer to one of our ports: (backend, backend port, our port, ack
/// number, flags).
type Answer = (IpAddr, u16, u16, u32, u8);

impl SynProber {
    /// Opens the sockets (needs CAP_NET_RAW).
    fn open(commands: mpsc::UnboundedSender<Command>) -> io::Result<SynProber> {
        // An IPv6-less host still probes IPv4 backends.
        let v4 = Family::open(false);
        let v6 = Family::open(true);
        if let (Err(e), Err(_)) = (&v4, &v6) {
            return Err(io::Error::from_raw_os_error(
                e.raw_os_error().unwrap_or(libc::EPERM),
            ));
        }
        let (mut v4, mut v6) = (v4.ok(), v6.ok());
        let ports: Vec<u16> = [&v4, &v6]
            .into_iter()
            .flatten()
            .flat_map(|f| f.ports.iter().copied())
            .collect();
        let ring = if RAW_ANSWERS.load(Ordering::Relaxed) {
            Err(io::Error::other("raw sockets asked for"))
        } else {
            AnswerRing::open(&ports)
        };
        let ring = match ring {
            Ok(ring) => Some(ring),
            Err(e) => {
                tracing::info!(
                    "no receive ring for half-open probes' answers ({e}): reading them from raw sockets"
                );
                for (family, is_v6) in [(&mut v4, false), (&mut v6, true)] {
                    if let Some(f) = family {
                        f.receive_raw(is_v6)?;
                    }
                }
                None
            }
        };
        Ok(SynProber {
            v4,
            v6,
            ring,
            ports,
            targets: Targets::default(),
            due: Wheel::new(Instant::now()),
            deadlines: Wheel::new(Instant::now()),
            waiting: FxHashMap::default(),
            sources: FxHashMap::default(),
            seq: u64::from(rand_u32()) << 32 | u64::from(rand_u32()) | 1,
            commands,
        })
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Add(target) => {
                let due = target.due;
                let slot = self.targets.insert(target);
                let tick = self.due.file(due, slot);
                if let Some(t) = self.targets.get_mut(slot) {
                    t.due_tick = tick;
                }
            }
            Command::Remove(id) => {
                if let Some(slot) = self.targets.slot_of(id)
                    && let Some(Target {
                        flight: Some(f), ..
                    }) = self.targets.remove(slot)
                    && let Some(key) = f.key
                {
                    self.waiting.remove(&key);
                }
            }
            Command::Connected(id, probe) => {
                if let Some(slot) = self.targets.slot_of(id)
                    && self
                        .targets
                        .get(slot)
                        .is_some_and(|t| t.flight.as_ref().is_some_and(|f| f.key.is_none()))
                {
                    self.finish(slot, probe);
                }
            }
        }
    }

    /// One wake: answers first (an answer already here is no timeout),
    /// then timeouts, then the SYNs now due.
    fn round(&mut self, now: Instant) {
        for (addr, sport, dport, ack, flags) in self.answers() {
            let Some(&slot) = self.waiting.get(&(addr, sport, dport)) else {
                continue;
            };
            // Only the answer to this SYN (a late one to an earlier probe
            // carries another ack number).
            let mine = self
                .targets
                .get(slot)
                .and_then(|t| t.flight.as_ref())
                .map(|f| f.ack);
            if mine == Some(ack) {
                let probe = if flags & (SYN | ACK) == SYN | ACK {
                    Probe::Up
                } else {
                    Probe::Down(Failure::Connect)
                };
                self.finish(slot, probe);
            }
        }
        for (tick, slot) in self.deadlines.take(now) {
            let expired = self
                .targets
                .get(slot)
                .and_then(|t| t.flight.as_ref())
                .is_some_and(|f| f.key.is_some() && f.deadline_tick == tick);
            if expired {
                self.finish(slot, Probe::Down(Failure::Timeout));
            }
        }
        self.send_due(now);
    }

    fn family(&self, v6: bool) -> Option<&Family> {
        if v6 {
            self.v6.as_ref()
        } else {
            self.v4.as_ref()
        }
    }

    /// The answers to our ports waiting in the ring (or on the raw
    /// sockets).
    fn answers(&mut self) -> Vec<Answer> {
        let mut out = Vec::new();
        if let Some(ring) = &mut self.ring {
            let ports = &self.ports;
            ring.drain(|packet| out.extend(answer_in_packet(packet, ports)));
            return out;
        }
        for f in [&self.v4, &self.v6].into_iter().flatten() {
            let Some(rx) = &f.rx else { continue };
            while let Ok(n) = recv_batch(rx, |buf, from| {
                out.extend(answer_of(buf, from, &f.ports));
            }) {
                if n < RECV_BATCH {
                    break;
                }
            }
        }
        out
    }

    /// The probe is over: forget its SYN, hand the outcome on, and drop a
    /// one-off target.
    fn finish(&mut self, slot: u64, probe: Probe) {
        let Some(t) = self.targets.get_mut(slot) else {
            return;
        };
        if let Some(key) = t.flight.take().and_then(|f| f.key) {
            self.waiting.remove(&key);
        }
        (t.sink)(probe);
        if t.every.is_none() {
            self.targets.remove(slot);
        }
    }

    fn source(&mut self, to: IpAddr, port: u16, now: Instant) -> io::Result<IpAddr> {
        if let Some((ip, at)) = self.sources.get(&to)
            && now.duration_since(*at) < SOURCE_TTL
        {
            return Ok(*ip);
        }
        let ip = source_toward(to, port)?;
        self.sources.insert(to, (ip, now));
        Ok(ip)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq ^= self.seq << 13;
        self.seq ^= self.seq >> 7;
        self.seq ^= self.seq << 17;
        (self.seq >> 16) as u32
    }

    /// Sends every SYN due by `now`, a batch per family.
    fn send_due(&mut self, now: Instant) {
        let mut out: [Vec<Outgoing>; 2] = Default::default();
        for (tick, slot) in self.due.take(now) {
            let Some(t) = self.targets.get_mut(slot) else {
                continue;
            };
            if t.due_tick != tick {
                continue;
            }
            if let Some(every) = t.every {
                // The same phase every round; a round missed is skipped.
                let due = t.due;
                t.due = if due + every > now {
                    due + every
                } else {
                    now + every
                };
                t.due_tick = self.due.file(t.due, slot);
            }
            if t.flight.is_some() {
                // The last SYN is still out (a timeout past the interval).
                continue;
            }
            let (addr, port, timeout) = (t.addr, t.port, t.timeout);
            match self.prepare(slot, addr, port, timeout) {
                Ok(Some(syn)) => out[usize::from(addr.is_ipv6())].push(syn),
                Ok(None) => {}
                Err(probe) => self.finish(slot, probe),
            }
        }
        for (v6, batch) in [false, true].into_iter().zip(out) {
            if batch.is_empty() {
                continue;
            }
            let Some(f) = self.family(v6) else { continue };
            let sent = send_batch(&f.tx, &batch);
            for ((slot, key, ack, _), result) in batch.into_iter().zip(sent) {
                let target = self.targets.get_mut(slot);
                match (result, target) {
                    (Ok(()), Some(t)) => {
                        let deadline_tick = self.deadlines.file(now + t.timeout, slot);
                        t.flight = Some(Flight {
                            key: Some(key),
                            ack,
                            deadline_tick,
                        });
                    }
                    (Ok(()), None) => {
                        self.waiting.remove(&key);
                    }
                    (Err(e), _) => {
                        self.waiting.remove(&key);
                        self.finish(slot, local_or_down(&e));
                    }
                }
            }
        }
    }

    /// The SYN for one target, or `Ok(None)` when a connect goes instead
    /// (every source port busy toward this backend), or the outcome when
    /// no probe can be made from here.
    fn prepare(
        &mut self,
        slot: u64,
        addr: IpAddr,
        port: u16,
        timeout: Duration,
    ) -> Result<Option<Outgoing>, Probe> {
        let Some(f) = self.family(addr.is_ipv6()) else {
            return Err(Probe::Local(libc::EAFNOSUPPORT));
        };
        let free = f
            .ports
            .iter()
            .map(|&p| (addr, port, p))
            .find(|k| !self.waiting.contains_key(k));
        let Some(key) = free else {
            let Some(id) = self.targets.get(slot).map(|t| t.id) else {
                return Ok(None);
            };
            let commands = self.commands.clone();
            tokio::spawn(async move {
                let probe = probe_tcp(addr, port, timeout).await;
                let _ = commands.send(Command::Connected(id, probe));
            });
            if let Some(t) = self.targets.get_mut(slot) {
                t.flight = Some(Flight {
                    key: None,
                    ack: 0,
                    deadline_tick: 0,
                });
            }
            return Ok(None);
        };
        let ours = self
            .source(addr, port, Instant::now())
            .map_err(|e| local_or_down(&e))?;
        // Taken now: the next SYN of this batch toward the same backend
        // needs another port.
        self.waiting.insert(key, slot);
        let seq = self.next_seq();
        let mut syn = [0u8; 60];
        let ip = write_ip_header(&mut syn, ours, addr, 20);
        write_tcp_header(&mut syn[ip..], (ours, addr), key.2, port, seq, SYN);
        Ok(Some((slot, key, seq.wrapping_add(1), (syn, ip + 20))))
    }
}

/// Sends each (.., IP packet) to its address; one result per packet.
fn send_batch(fd: &OwnedFd, packets: &[Outgoing]) -> Vec<io::Result<()>> {
    let names: Vec<_> = packets
        .iter()
        .map(|(_, (to, _, _), _, _)| sockaddr(&SocketAddr::new(*to, 0)))
        .collect();
    let mut iovs: Vec<libc::iovec> = packets
        .iter()
        .map(|(.., (packet, len))| libc::iovec {
            iov_base: packet.as_ptr() as *mut libc::c_void,
            iov_len: *len,
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = names
        .iter()
        .zip(iovs.iter_mut())
        .map(|((name, len), iov)| {
            // SAFETY: all-zero is a valid mmsghdr.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (name as *const libc::sockaddr_storage).cast_mut().cast();
            m.msg_hdr.msg_namelen = *len;
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut results = Vec::with_capacity(msgs.len());
    while results.len() < msgs.len() {
        let rest = &mut msgs[results.len()..];
        let n = rest.len().min(SEND_BATCH);
        // SAFETY: every header points at a name and an iovec that outlive
        // the call.
        let sent = unsafe { libc::sendmmsg(fd.as_raw_fd(), rest.as_mut_ptr(), n as u32, 0) };
        if sent <= 0 {
            // The first message failed: its error; the rest go next call.
            results.push(Err(if sent < 0 {
                io::Error::last_os_error()
            } else {
                io::Error::from_raw_os_error(libc::EIO)
            }));
        } else {
            results.extend((0..sent).map(|_| Ok(())));
        }
    }
    results
}

/// Reads up to `RECV_BATCH` datagrams waiting on a raw socket, each to
/// `each` with its sender; how many were read (none waiting:
/// `Err(WouldBlock)`).
fn recv_batch(fd: &OwnedFd, mut each: impl FnMut(&[u8], IpAddr)) -> io::Result<usize> {
    let mut bufs = [[0u8; 128]; RECV_BATCH];
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut names: [libc::sockaddr_storage; RECV_BATCH] = unsafe { std::mem::zeroed() };
    let mut iovs: [libc::iovec; RECV_BATCH] = std::array::from_fn(|_| libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    });
    // SAFETY: all-zero is a valid mmsghdr.
    let mut msgs: [libc::mmsghdr; RECV_BATCH] = unsafe { std::mem::zeroed() };
    for (((m, name), iov), buf) in msgs
        .iter_mut()
        .zip(names.iter_mut())
        .zip(iovs.iter_mut())
        .zip(bufs.iter_mut())
    {
        iov.iov_base = buf.as_mut_ptr().cast();
        iov.iov_len = buf.len();
        m.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every header points at a buffer and a name that outlive the
    // call; MSG_DONTWAIT: never blocks.
    let n = unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            msgs.as_mut_ptr(),
            RECV_BATCH as u32,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for ((m, buf), name) in msgs[..n].iter().zip(&bufs).zip(&names) {
        if let Some(from) = ip_of(name) {
            each(&buf[..(m.msg_len as usize).min(buf.len())], from);
        }
    }
    Ok(n)
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
    set_option(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)?;
    // Thousands of answers a second: a few MB, not the default ~200 KB.
    let bytes: libc::c_int = 4 << 20;
    set_option(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &bytes)
        .or_else(|_| set_option(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &bytes))
}

fn local_or_down(e: &io::Error) -> Probe {
    // A full send buffer is this host's trouble too.
    if is_local_error(e) || e.kind() == io::ErrorKind::WouldBlock {
        Probe::Local(e.raw_os_error().unwrap_or(0))
    } else {
        Probe::Down(Failure::Connect)
    }
}

/// The (backend, backend port, our port, ack number, flags) of a segment
/// to one of `ports`, as a raw TCP socket delivers it (IPv4: with its IP
/// header; IPv6: the segment alone, the source in `from`).
fn answer_of(buf: &[u8], from: IpAddr, ports: &[u16]) -> Option<Answer> {
    let tcp = if from.is_ipv6() {
        buf
    } else {
        let ihl = (*buf.first()? & 0x0F) as usize * 4;
        buf.get(ihl..)?
    };
    answer_in(tcp, from, ports)
}

/// The same, from a whole IP packet (IPv6: without extension headers).
fn answer_in_packet(packet: &[u8], ports: &[u16]) -> Option<Answer> {
    let (from, tcp) = match packet.first()? >> 4 {
        4 => {
            let ihl = (packet[0] & 0x0F) as usize * 4;
            let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            (IpAddr::from(src), packet.get(ihl..)?)
        }
        6 => {
            let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            (IpAddr::from(src), packet.get(40..)?)
        }
        _ => return None,
    };
    answer_in(tcp, from, ports)
}

/// An answer from `from` in a TCP segment.
fn answer_in(tcp: &[u8], from: IpAddr, ports: &[u16]) -> Option<Answer> {
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

/// The probing thread's handle.
struct Scheduler {
    commands: mpsc::UnboundedSender<Command>,
    next_id: AtomicU64,
    /// Answers come from the receive ring (else from raw sockets).
    ring: bool,
}

/// Where the probing thread reads answers: `Some(true)` from the receive
/// ring, `Some(false)` from raw sockets, `None` before the first probe or
/// without raw sockets at all.
pub fn answers_from_ring() -> Option<bool> {
    SCHEDULER.get()?.as_ref().map(|s| s.ring)
}

static SCHEDULER: OnceLock<Option<Scheduler>> = OnceLock::new();

/// Set before the first probe: answers are read from raw sockets even
/// where the receive ring could be had (what a host without `AF_PACKET`
/// gets; lets that path be tested).
static RAW_ANSWERS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Reads the answers of this process's half-open probes from raw sockets,
/// not the receive ring; only before the first probe.
pub fn read_answers_from_raw_sockets() {
    RAW_ANSWERS.store(true, Ordering::Relaxed);
}

/// Starts the probing thread on first use (in the caller's network
/// namespace: a thread starts in its parent's); `None` where raw sockets
/// are not allowed (no CAP_NET_RAW).
fn scheduler() -> Option<&'static Scheduler> {
    SCHEDULER
        .get_or_init(|| {
            let (ready, started) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("syn-probes".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    rt.block_on(async move {
                        let (commands, queue) = mpsc::unbounded_channel();
                        match SynProber::open(commands.clone()) {
                            Ok(prober) => {
                                let _ = ready.send(Ok((commands, prober.ring.is_some())));
                                run(prober, queue).await;
                            }
                            Err(e) => {
                                let _ = ready.send(Err(e));
                            }
                        }
                    });
                });
            let opened = spawned.and_then(|_| {
                started
                    .recv()
                    .map_err(|_| io::Error::from_raw_os_error(libc::EIO))?
            });
            match opened {
                Ok((commands, ring)) => Some(Scheduler {
                    commands,
                    next_id: AtomicU64::new(1),
                    ring,
                }),
                Err(e) => {
                    tracing::warn!("half-open health probes need raw sockets (CAP_NET_RAW): {e}; probing with connects instead");
                    None
                }
            }
        })
        .as_ref()
}

async fn run(mut prober: SynProber, mut queue: mpsc::UnboundedReceiver<Command>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            command = queue.recv() => match command {
                Some(c) => prober.command(c),
                None => return,
            },
            _ = tick.tick(), if !prober.targets.is_empty() => prober.round(Instant::now()),
        }
    }
}

/// A target of the probing thread; dropping it stops its probes.
pub struct Registration {
    id: u64,
    commands: mpsc::UnboundedSender<Command>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Remove(self.id));
    }
}

/// Probes `addr:port` from `first` on, every `every` (`None`: once), each
/// outcome to `sink`. `None` where raw sockets are not allowed: the
/// caller probes with connects instead.
pub fn schedule(
    addr: IpAddr,
    port: u16,
    (first, every): (Instant, Option<Duration>),
    timeout: Duration,
    sink: Sink,
) -> Option<Registration> {
    let s = scheduler()?;
    let id = s.next_id.fetch_add(1, Ordering::Relaxed);
    let target = Target {
        id,
        addr,
        port,
        every,
        timeout,
        due: first,
        due_tick: 0,
        sink,
        flight: None,
    };
    s.commands.send(Command::Add(target)).ok()?;
    Some(Registration {
        id,
        commands: s.commands.clone(),
    })
}

/// One half-open probe of `addr:port`; a plain connect where raw sockets
/// are not allowed.
pub async fn probe_syn(addr: IpAddr, port: u16, timeout: Duration) -> Probe {
    let (tx, rx) = oneshot::channel();
    let mut tx = Some(tx);
    let sink: Sink = Box::new(move |probe| {
        if let Some(tx) = tx.take() {
            let _ = tx.send(probe);
        }
    });
    let Some(registration) = schedule(addr, port, (Instant::now(), None), timeout, sink) else {
        return probe_tcp(addr, port, timeout).await;
    };
    let probe = rx.await.unwrap_or(Probe::Local(libc::EIO));
    drop(registration);
    probe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wheel_never_hands_out_early_and_loses_nothing() {
        let epoch = Instant::now();
        let mut w = Wheel::new(epoch);
        let at = |ms: u64| epoch + Duration::from_millis(ms);
        w.file(at(0), 1);
        w.file(at(3), 2);
        w.file(at(10), 3);
        w.file(at(11), 4);
        w.file(at(35), 5);
        let ids = |v: Vec<(u64, u64)>| v.into_iter().map(|(_, id)| id).collect::<Vec<_>>();
        // Ticks of 10 ms: at 9 ms only tick 0's begun... and nothing is
        // filed under it (the first tick taken is 1).
        assert_eq!(ids(w.take(at(9))), Vec::<u64>::new());
        assert_eq!(ids(w.take(at(10))), vec![1, 2, 3]);
        assert_eq!(ids(w.take(at(19))), Vec::<u64>::new());
        assert_eq!(ids(w.take(at(20))), vec![4]);
        // Filed for a time already past: the next tick to be taken.
        let t = w.file(at(0), 6);
        assert_eq!(t, 3);
        // A long sleep takes everything due, in order, once.
        assert_eq!(ids(w.take(at(10_000))), vec![6, 5]);
        assert_eq!(ids(w.take(at(20_000))), Vec::<u64>::new());
    }

    #[test]
    fn answers_are_read_from_whole_packets_of_either_family() {
        let ours = [40000u16];
        let syn_ack = |flags: u8| {
            let mut t = [0u8; 20];
            t[0..2].copy_from_slice(&80u16.to_be_bytes());
            t[2..4].copy_from_slice(&40000u16.to_be_bytes());
            t[8..12].copy_from_slice(&7u32.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = flags;
            t
        };
        let b4: IpAddr = "10.30.1.2".parse().unwrap();
        let b6: IpAddr = "fd00::2".parse().unwrap();
        let me4: IpAddr = "10.30.1.1".parse().unwrap();
        let me6: IpAddr = "fd00::1".parse().unwrap();
        for (from, to) in [(b4, me4), (b6, me6)] {
            let mut packet = [0u8; 60];
            let ip = write_ip_header(&mut packet, from, to, 20);
            packet[ip..ip + 20].copy_from_slice(&syn_ack(SYN | ACK));
            assert_eq!(
                answer_in_packet(&packet[..ip + 20], &ours),
                Some((from, 80, 40000, 7, SYN | ACK))
            );
            packet[ip..ip + 20].copy_from_slice(&syn_ack(ACK));
            assert_eq!(answer_in_packet(&packet[..ip + 20], &ours), None);
            assert_eq!(answer_in_packet(&packet[..ip + 10], &ours), None);
        }
        assert_eq!(answer_in_packet(&[0x50, 0, 0], &ours), None);
    }

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
