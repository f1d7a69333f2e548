//! The answers to half-open probes, read from a receive ring: a packet
//! socket (AF_PACKET, TPACKET_V2) whose classic BPF filter keeps only
//! SYN-ACKs and resets with ACK to our probe ports, copied by the kernel
//! into memory shared with lbd. Reading them takes no system call at all:
//! with `recvmmsg` on a raw socket each answer cost about a microsecond of
//! lbd's time (a message header copied in, the packet copied out, the
//! buffer freed), a sixth of a probe's whole cost.
//!
//! `SOCK_DGRAM`: packets start at their network header whatever the link
//! (Ethernet, loopback, tunnels without a link header).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::{Ordering, fence},
};

use crate::tunnel_probe::{ACK, RST, SYN};

/// Frames in the ring: at 10,000 answers a second read every 10 ms, a
/// hundred times a round's worth before the kernel must drop one.
const FRAMES: usize = 8192;
/// Header, address and the packet's first bytes (IP and TCP headers).
const FRAME_SIZE: usize = 256;
const BLOCK_SIZE: usize = 1 << 16;
/// Bytes of each packet kept: IPv4 or IPv6 header and the TCP header.
const SNAP: u32 = 160;
const TPACKET_V2: libc::c_int = 1;

pub struct AnswerRing {
    fd: OwnedFd,
    ring: *mut u8,
    /// The next frame to look at.
    next: usize,
}

// SAFETY: the mapping belongs to this value alone; it is only read and
// written through `&mut self`.
unsafe impl Send for AnswerRing {}

impl AnswerRing {
    /// Opens the ring for answers to any of `ports` (needs CAP_NET_RAW).
    pub fn open(ports: &[u16]) -> io::Result<AnswerRing> {
        // Protocol 0 receives nothing until bound: the filter and the
        // ring are in place before the first packet.
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        set_option(&fd, libc::SOL_PACKET, libc::PACKET_VERSION, &TPACKET_V2)?;
        // Our own SYNs and resets going out are not answers (older
        // kernels lack the option: the filter drops them anyway).
        let _ = set_option(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &1);
        let mut program = filter(ports);
        let fprog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_mut_ptr(),
        };
        set_option(&fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)?;
        let req = libc::tpacket_req {
            tp_block_size: BLOCK_SIZE as u32,
            tp_block_nr: (FRAMES * FRAME_SIZE / BLOCK_SIZE) as u32,
            tp_frame_size: FRAME_SIZE as u32,
            tp_frame_nr: FRAMES as u32,
        };
        set_option(&fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &req)?;
        // SAFETY: maps the ring the kernel just allocated for this socket.
        let ring = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FRAMES * FRAME_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ring == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ring = AnswerRing {
            fd,
            ring: ring.cast(),
            next: 0,
        };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut at: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        at.sll_family = libc::AF_PACKET as u16;
        at.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: binds to every interface with a valid sockaddr_ll.
        let rc = unsafe {
            libc::bind(
                ring.fd.as_raw_fd(),
                (&at as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ring)
    }

    /// Hands every packet waiting in the ring to `each` (IPv4 or IPv6
    /// packet from its header, at most `SNAP` bytes) and gives its frame
    /// back to the kernel; how many there were.
    pub fn drain(&mut self, mut each: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        loop {
            // SAFETY: `next` < FRAMES: the frame lies inside the mapping;
            // V2 frames never straddle blocks (BLOCK_SIZE is a multiple of
            // FRAME_SIZE).
            let hdr = unsafe { self.ring.add(self.next * FRAME_SIZE) }.cast::<libc::tpacket2_hdr>();
            // SAFETY: the status word is shared with the kernel: read it
            // volatile, then the frame only once it is ours (acquire).
            let status = unsafe { std::ptr::addr_of!((*hdr).tp_status).read_volatile() };
            if status & libc::TP_STATUS_USER == 0 {
                return n;
            }
            fence(Ordering::Acquire);
            // SAFETY: the kernel wrote a whole header into a frame it
            // handed us.
            let (net, len) = unsafe { ((*hdr).tp_net as usize, (*hdr).tp_snaplen as usize) };
            if net + len <= FRAME_SIZE {
                // SAFETY: inside this frame, written by the kernel.
                let packet = unsafe { std::slice::from_raw_parts(hdr.cast::<u8>().add(net), len) };
                each(packet);
            }
            fence(Ordering::Release);
            // SAFETY: the frame goes back to the kernel.
            unsafe {
                std::ptr::addr_of_mut!((*hdr).tp_status).write_volatile(libc::TP_STATUS_KERNEL)
            };
            self.next = (self.next + 1) % FRAMES;
            n += 1;
        }
    }
}

impl Drop for AnswerRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, no longer used.
        unsafe { libc::munmap(self.ring.cast(), FRAMES * FRAME_SIZE) };
    }
}

/// setsockopt(2) with a value of type `T`.
pub(crate) fn set_option<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is a valid T for the option's length.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where a filter instruction jumps.
#[derive(Clone, Copy)]
enum To {
    Next,
    Drop,
    Accept,
    V6,
    Ports,
}

/// The classic BPF program: packets for this host, IPv4 or IPv6 carrying
/// TCP (no extension headers: probes' answers have none), ACK with SYN or
/// RST, to one of `ports`; the first `SNAP` bytes of those, nothing of
/// the rest.
fn filter(ports: &[u16]) -> Vec<libc::sock_filter> {
    use libc::{
        BPF_ABS, BPF_B, BPF_H, BPF_IND, BPF_JA, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_LDX,
        BPF_MSH, BPF_RET, BPF_W,
    };
    let ad = |field: libc::c_int| (libc::SKF_AD_OFF + field) as u32;
    let tcp = u32::from(libc::IPPROTO_TCP as u8);
    let flags = u32::from(ACK);
    let answer = u32::from(SYN | RST);
    // (code, if true, if false, k); labels resolved below.
    let mut prog: Vec<(u32, To, To, u32)> = vec![
        (
            BPF_LD | BPF_W | BPF_ABS,
            To::Next,
            To::Next,
            ad(libc::SKF_AD_PKTTYPE),
        ),
        (
            BPF_JMP | BPF_JEQ | BPF_K,
            To::Next,
            To::Drop,
            libc::PACKET_HOST as u32,
        ),
        (
            BPF_LD | BPF_W | BPF_ABS,
            To::Next,
            To::Next,
            ad(libc::SKF_AD_PROTOCOL),
        ),
        (
            BPF_JMP | BPF_JEQ | BPF_K,
            To::V6,
            To::Next,
            libc::ETH_P_IPV6 as u32,
        ),
        (
            BPF_JMP | BPF_JEQ | BPF_K,
            To::Next,
            To::Drop,
            libc::ETH_P_IP as u32,
        ),
        // IPv4: protocol, then flags and port past the header's length.
        (BPF_LD | BPF_B | BPF_ABS, To::Next, To::Next, 9),
        (BPF_JMP | BPF_JEQ | BPF_K, To::Next, To::Drop, tcp),
        (BPF_LDX | BPF_B | BPF_MSH, To::Next, To::Next, 0),
        (BPF_LD | BPF_B | BPF_IND, To::Next, To::Next, 13),
        (BPF_JMP | BPF_JSET | BPF_K, To::Next, To::Drop, flags),
        (BPF_JMP | BPF_JSET | BPF_K, To::Next, To::Drop, answer),
        (BPF_LD | BPF_H | BPF_IND, To::Next, To::Next, 2),
        (BPF_JMP | BPF_JA, To::Ports, To::Ports, 0),
        // IPv6 (label V6): next header, flags and port at fixed places.
        (BPF_LD | BPF_B | BPF_ABS, To::Next, To::Next, 6),
        (BPF_JMP | BPF_JEQ | BPF_K, To::Next, To::Drop, tcp),
        (BPF_LD | BPF_B | BPF_ABS, To::Next, To::Next, 40 + 13),
        (BPF_JMP | BPF_JSET | BPF_K, To::Next, To::Drop, flags),
        (BPF_JMP | BPF_JSET | BPF_K, To::Next, To::Drop, answer),
        (BPF_LD | BPF_H | BPF_ABS, To::Next, To::Next, 40 + 2),
    ];
    let v6 = 13;
    let ports_at = prog.len();
    for &p in ports {
        prog.push((
            BPF_JMP | BPF_JEQ | BPF_K,
            To::Accept,
            To::Next,
            u32::from(p),
        ));
    }
    let drop = prog.len();
    prog.push((BPF_RET | BPF_K, To::Next, To::Next, 0));
    let accept = prog.len();
    prog.push((BPF_RET | BPF_K, To::Next, To::Next, SNAP));
    let at = |label: To, i: usize| -> usize {
        let target = match label {
            To::Next => i + 1,
            To::Drop => drop,
            To::Accept => accept,
            To::V6 => v6,
            To::Ports => ports_at,
        };
        target - (i + 1)
    };
    prog.iter()
        .enumerate()
        .map(|(i, &(code, jt, jf, k))| {
            let ja = code == BPF_JMP | BPF_JA;
            libc::sock_filter {
                code: code as u16,
                jt: if ja { 0 } else { at(jt, i) as u8 },
                jf: if ja { 0 } else { at(jf, i) as u8 },
                k: if ja { at(jt, i) as u32 } else { k },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_inside_the_program() {
        let prog = filter(&[40000, 40001, 40002]);
        let jmp = |c: u16| c & 0x07 == libc::BPF_JMP as u16;
        for (i, ins) in prog.iter().enumerate() {
            if jmp(ins.code) {
                let ja = ins.code == (libc::BPF_JMP | libc::BPF_JA) as u16;
                let far = if ja {
                    ins.k as usize
                } else {
                    ins.jt.max(ins.jf) as usize
                };
                assert!(i + 1 + far < prog.len(), "instruction {i} jumps out");
            }
        }
        // The IPv6 branch begins where the protocol test sends it.
        assert_eq!(prog[3].jt as usize + 4, 13);
        assert_eq!(prog[13].k, 6, "IPv6 next header");
        // The last two return: nothing, or the headers.
        assert_eq!(prog[prog.len() - 2].k, 0);
        assert_eq!(prog[prog.len() - 1].k, SNAP);
    }
}
