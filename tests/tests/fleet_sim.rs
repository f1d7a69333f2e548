//! The fleet simulator decides as the kernel does: the same VIPs, backends
//! and table size in the simulator and in the real XDP program give the
//! same Maglev tables slot for slot and send every flow's SYN to the same
//! backend, before and after a backend change.

use std::net::IpAddr;

use lb_common::{PROTO_TCP, maps::VipKey, settings::Settings};
use lb_tests::{
    fixture::Harness,
    have_root,
    packets::{self, TcpKind},
};
use lb_userspace::fleet_sim::{Event, Sim, SimConfig};

const SIZE: u32 = 1021;

fn key(vip: usize) -> VipKey {
    VipKey::new(Sim::vip_address(vip), 443, PROTO_TCP)
}

/// Installs every VIP of the simulation in the kernel; checks the tables and
/// each flow's SYN. Returns how many flows were checked.
fn compare(sim: &Sim, h: &mut Harness, vips: usize) -> usize {
    for v in 0..vips {
        let meta = h.add_vip(key(v), v as u32 + 1, &sim.vip_backends(v), SIZE);
        let kernel = h.dp.read_slots(meta.table_offset, meta.table_size);
        assert_eq!(
            kernel,
            sim.table(v),
            "VIP {v}: the kernel's table is the simulator's"
        );
    }
    let placements = sim.placements();
    for (vip, flow, expected) in &placements {
        let (IpAddr::V4(src), IpAddr::V4(dst)) = (
            lb_common::user::ip_from_addr(&flow.src, flow.family),
            lb_common::user::ip_from_addr(&flow.dst, flow.family),
        ) else {
            unreachable!("the simulator's flows are IPv4")
        };
        let syn = packets::tcp(
            src,
            u16::from_be(flow.sport),
            dst,
            u16::from_be(flow.dport),
            TcpKind::Syn,
            0,
        );
        h.send(&syn);
        let chosen = h.dp.conntrack_get(flow).map(|e| e.backend_id);
        assert_eq!(chosen, Some(*expected), "VIP {vip}: flow {flow:?}");
    }
    placements.len()
}

#[test]
fn the_simulator_and_the_kernel_choose_the_same_backends() {
    if !have_root() {
        return;
    }
    // One VIP: its backends (10.50.0.x) are where the harness routes.
    let vips = 1;
    let mut sim = Sim::new(SimConfig {
        seed: 9,
        instances: 4,
        vips,
        backends_per_vip: 7,
        flows: 400,
        table_size: SIZE,
    });
    let mut h = Harness::with_conntrack(Settings::DEFAULT, 1 << 16);
    let checked = compare(&sim, &mut h, vips);
    assert_eq!(checked, 400);
    // A backend added, then another one removed.
    sim.run(&Event::BackendAdded { vip: 0 });
    sim.run(&Event::BackendRemoved { vip: 0 });
    let checked = compare(&sim, &mut h, vips);
    assert!(checked >= 400, "{checked}");
}
