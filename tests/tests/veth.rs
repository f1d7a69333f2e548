//! The program attached to a real veth in a namespace, forwarding real
//! packets: a client namespace sends UDP datagrams to a VIP through the LB
//! namespace; the backend namespace captures what arrives and checks it is
//! the client's datagram inside an IPIP header addressed to the backend.
//! Needs root.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use lb_common::{
    PROTO_UDP,
    maps::{Reason, VipKey},
    settings::Settings,
};
use lb_tests::{
    fixture::vip_meta,
    have_root,
    netns::{NetNs, capture},
};
use lb_userspace::{
    dataplane::{Dataplane, LoadOptions},
    slots::SlotAllocator,
    vip_table::{BackendSpec, install_vip},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 50, 0, 1);
const DATAGRAMS: u16 = 20;

fn receive(fd: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    // SAFETY: buffer is valid for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    (n > 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

#[test]
fn forwards_real_packets_through_a_veth() {
    if !have_root() {
        return;
    }
    let client = NetNs::new("lbv-client");
    let lb = NetNs::new("lbv-lb");
    let backend = NetNs::new("lbv-backend");
    lb.link("l0", "10.200.0.1/24", &client, "c0", "10.200.0.2/24");
    lb.link("l1", "10.50.0.254/24", &backend, "b0", "10.50.0.1/24");
    client.ip(&["route", "add", "default", "via", "10.200.0.1"]);
    lb.sh("sysctl -qw net.ipv4.conf.all.forwarding=1");

    // Load and attach in the LB namespace.
    let lb_guard = lb.enter();
    let opts = LoadOptions {
        settings: Settings::DEFAULT,
        maglev_slots: 1 << 16,
        conntrack_entries: 1 << 12,
        ..LoadOptions::default()
    };
    let mut dp = Dataplane::load(&opts).expect("load");
    dp.attach("l0", XdpMode::Skb).expect("attach to l0");
    let mut alloc = SlotAllocator::new(dp.slot_capacity());
    let key = VipKey::new(IpAddr::V4(VIP), 53, PROTO_UDP);
    let backends = [BackendSpec {
        id: 1,
        addr: IpAddr::V4(BACKEND),
        weight: 1,
    }];
    install_vip(&mut dp, &mut alloc, key, vip_meta(1), &backends, 1009, 0).expect("install VIP");
    let lb_own = UdpSocket::bind("10.200.0.1:9999").unwrap();
    lb_own
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    drop(lb_guard);

    let backend_guard = backend.enter();
    let tap = capture("b0");
    drop(backend_guard);

    let client_guard = client.enter();
    let sender = UdpSocket::bind("10.200.0.2:0").unwrap();
    drop(client_guard);

    // Not for a VIP: reaches the LB namespace's own socket untouched.
    sender.send_to(b"hello lb", "10.200.0.1:9999").unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = lb_own
        .recv_from(&mut buf)
        .expect("non-VIP datagram passed to the stack");
    assert_eq!(&buf[..n], b"hello lb");
    assert_eq!(from.ip(), IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2)));

    // VIP traffic: encapsulated toward the backend.
    for i in 0..DATAGRAMS {
        let msg = format!("datagram {i:02}");
        sender
            .send_to(msg.as_bytes(), SocketAddr::new(IpAddr::V4(VIP), 53))
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while got.len() < DATAGRAMS as usize && Instant::now() < deadline {
        let Some(frame) = receive(&tap) else { continue };
        if frame.len() < 34 + 28 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 4 {
            continue; // ARP and the like
        }
        got.push(frame);
    }
    assert_eq!(
        got.len(),
        DATAGRAMS as usize,
        "every datagram reached the backend encapsulated"
    );
    for (i, frame) in got.iter().enumerate() {
        let outer = &frame[14..34];
        assert_eq!(
            &outer[16..20],
            &BACKEND.octets(),
            "outer destination is the backend"
        );
        assert_eq!(
            &outer[12..14],
            &[172, 16],
            "outer source from the flow prefix"
        );
        let inner = &frame[34..];
        assert_eq!(
            &inner[12..16],
            &[10, 200, 0, 2],
            "inner source is the client"
        );
        assert_eq!(
            &inner[16..20],
            &VIP.octets(),
            "inner destination is the VIP"
        );
        assert_eq!(
            &inner[28..],
            format!("datagram {i:02}").as_bytes(),
            "payload intact, in order"
        );
    }
    let forwarded = dp.packets_of(&Reason::FORWARDED);
    assert_eq!(
        forwarded, DATAGRAMS as u64,
        "each datagram counted once as forwarded"
    );
    assert!(
        dp.reason_counter(Reason::Redirect).packets >= 1,
        "resolved neighbour: XDP_REDIRECT to l1"
    );
    assert_eq!(dp.backend_counter(1).packets, DATAGRAMS as u64);
    assert!(dp.reason_counter(Reason::PassNotVip).packets >= 1);
}
