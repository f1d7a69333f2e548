//! A harness that runs the real XDP program under `BPF_PROG_TEST_RUN` in a
//! namespace of its own (so `bpf_fib_lookup` sees routes and neighbours the
//! test set up, not the host's) and checks every packet against the
//! reference model: action, output bytes, counters, connection table.
//!
//! The namespace has two veth pairs:
//! - `lb0` (10.100.0.2/24, MAC `LB_MAC`), neighbour 10.100.0.1 = `ROUTER_MAC`;
//!   backends in 10.50.0.0/24 route via it: XDP_TX back out of `lb0`;
//!   backends in 10.70.0.0/24 route via 10.100.0.9, which has no neighbour
//!   entry: "no neighbour", handed to the kernel.
//! - `lb1` (10.101.0.2/24, MAC `LB1_MAC`), neighbour 10.101.0.1 = `LB1_PEER_MAC`;
//!   backends in 10.60.0.0/24: XDP_REDIRECT to `lb1`.
//! - the same for IPv6: `lb0` fd00:100::2/64 (router fd00:100::1), backends
//!   in fd00:50::/64 (XDP_TX), fd00:70::/64 (via fd00:100::9, no neighbour);
//!   `lb1` fd00:101::2/64 (peer fd00:101::1), backends in fd00:60::/64.
//! - anything else has no route.

use std::net::{IpAddr, Ipv4Addr};

use lb_common::{
    maps::{
        Addr, BACKEND_F_RETIRED, BACKEND_F_VALID, Backend, Counter, FlowKey, PrevTable,
        QuicServerKey, VipById, VipKey, VipMeta,
    },
    model::{Decision, ModelMaps, ModelNextHop, ModelParse, parse},
    settings::Settings,
};
use lb_userspace::{
    dataplane::{Dataplane, LoadOptions, TestRunOutput},
    slots::SlotAllocator,
    vip_table::{BackendSpec, derived_keys, install_vip, maglev_ids},
};

use crate::{
    netns::{NetNs, NsGuard, ifindex},
    packets::{LB_MAC, ROUTER_MAC},
};

pub const LB1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
pub const LB1_PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const MTU: u16 = 1500;

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub struct Harness {
    pub dp: Dataplane,
    pub model: ModelMaps,
    pub alloc: SlotAllocator,
    pub lb0: u32,
    pub lb1: u32,
    /// Counters the model says the kernel should have, for batched checks.
    expected: Vec<Counter>,
    _guard: NsGuard,
    /// Shared with twins (`twin`): the namespace goes with the last one.
    _ns: std::rc::Rc<NetNs>,
    conntrack_entries: u32,
}

/// The kernel's and the model's view of one packet.
pub struct Outcome {
    pub kernel: TestRunOutput,
    pub model: Decision,
}

impl Harness {
    /// Puts the calling thread in this harness's namespace (FIB lookups of
    /// test runs resolve there) until the guard drops.
    pub fn enter(&self) -> NsGuard {
        self._ns.enter()
    }

    /// Runs `ip` in this harness's namespace (e.g. to change a neighbour).
    pub fn ip(&self, args: &[&str]) {
        self._ns.ip(args);
    }

    pub fn new(settings: Settings) -> Harness {
        Self::with_conntrack(settings, 1 << 16)
    }

    /// Like `new`, with a connection table of `conntrack_entries`.
    pub fn with_conntrack(settings: Settings, conntrack_entries: u32) -> Harness {
        Self::with_object(settings, conntrack_entries, None)
    }

    /// Like `with_conntrack`, running `object` (another build's XDP
    /// program, for A/B benchmarks) instead of the embedded one.
    pub fn with_object(
        settings: Settings,
        conntrack_entries: u32,
        object: Option<&'static [u8]>,
    ) -> Harness {
        let ns = NetNs::new("lbfx");
        ns.ip(&[
            "link",
            "add",
            "lb0",
            "address",
            &mac_str(&LB_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "rt0",
            "address",
            &mac_str(&ROUTER_MAC),
        ]);
        ns.ip(&[
            "link",
            "add",
            "lb1",
            "address",
            &mac_str(&LB1_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "x1",
            "address",
            &mac_str(&LB1_PEER_MAC),
        ]);
        for dev in ["lb0", "rt0", "lb1", "x1"] {
            ns.ip(&["link", "set", dev, "up"]);
        }
        ns.ip(&["addr", "add", "10.100.0.2/24", "dev", "lb0"]);
        ns.ip(&["addr", "add", "10.101.0.2/24", "dev", "lb1"]);
        ns.ip(&[
            "neigh",
            "replace",
            "10.100.0.1",
            "lladdr",
            &mac_str(&ROUTER_MAC),
            "dev",
            "lb0",
            "nud",
            "permanent",
        ]);
        ns.ip(&[
            "neigh",
            "replace",
            "10.101.0.1",
            "lladdr",
            &mac_str(&LB1_PEER_MAC),
            "dev",
            "lb1",
            "nud",
            "permanent",
        ]);
        ns.ip(&[
            "route",
            "add",
            "10.50.0.0/24",
            "via",
            "10.100.0.1",
            "dev",
            "lb0",
        ]);
        ns.ip(&[
            "route",
            "add",
            "10.60.0.0/24",
            "via",
            "10.101.0.1",
            "dev",
            "lb1",
        ]);
        ns.ip(&[
            "route",
            "add",
            "10.70.0.0/24",
            "via",
            "10.100.0.9",
            "dev",
            "lb0",
        ]);
        for (addr, dev) in [("fd00:100::2/64", "lb0"), ("fd00:101::2/64", "lb1")] {
            ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"]);
        }
        for (peer, mac, dev) in [
            ("fd00:100::1", ROUTER_MAC, "lb0"),
            ("fd00:101::1", LB1_PEER_MAC, "lb1"),
        ] {
            ns.ip(&[
                "-6",
                "neigh",
                "replace",
                peer,
                "lladdr",
                &mac_str(&mac),
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        for (net, via, dev) in [
            ("fd00:50::/64", "fd00:100::1", "lb0"),
            ("fd00:60::/64", "fd00:101::1", "lb1"),
            ("fd00:70::/64", "fd00:100::9", "lb0"),
        ] {
            ns.ip(&["-6", "route", "add", net, "via", via, "dev", dev]);
        }
        ns.sh("sysctl -qw net.ipv4.conf.all.forwarding=1 net.ipv6.conf.all.forwarding=1");
        let guard = ns.enter();
        let opts = LoadOptions {
            settings,
            maglev_slots: 1 << 20,
            conntrack_entries,
            pin_path: None,
            object,
            ..LoadOptions::default()
        };
        let dp = Dataplane::load(&opts).expect("loading the XDP program");
        let model = ModelMaps {
            settings,
            ..ModelMaps::default()
        };
        let alloc = SlotAllocator::new(dp.slot_capacity());
        Harness {
            expected: vec![Counter::default(); lb_common::maps::Reason::COUNT as usize],
            lb0: ifindex("lb0"),
            lb1: ifindex("lb1"),
            dp,
            model,
            alloc,
            _guard: guard,
            _ns: std::rc::Rc::new(ns),
            conntrack_entries,
        }
    }

    /// Another program (`object`, or the embedded one) with maps of its
    /// own, in this harness's namespace and devices: for A/B benchmarks,
    /// where two namespaces could differ in ways that are not the code's.
    pub fn twin(&self, object: Option<&'static [u8]>) -> Harness {
        let guard = self._ns.enter();
        let settings = self.model.settings;
        let opts = LoadOptions {
            settings,
            maglev_slots: 1 << 20,
            conntrack_entries: self.conntrack_entries,
            pin_path: None,
            object,
            ..LoadOptions::default()
        };
        let dp = Dataplane::load(&opts).expect("loading the XDP program");
        let alloc = SlotAllocator::new(dp.slot_capacity());
        Harness {
            expected: vec![Counter::default(); lb_common::maps::Reason::COUNT as usize],
            lb0: self.lb0,
            lb1: self.lb1,
            dp,
            model: ModelMaps {
                settings,
                ..ModelMaps::default()
            },
            alloc,
            _guard: guard,
            _ns: self._ns.clone(),
            conntrack_entries: self.conntrack_entries,
        }
    }

    /// What the namespace's FIB answers, for the model.
    pub fn next_hop(&self) -> impl Fn(&Addr, u16) -> ModelNextHop + use<> {
        let (lb0, lb1) = (self.lb0, self.lb1);
        move |addr: &Addr, tot_len: u16| {
            let o = addr[0].to_ne_bytes();
            // IPv6 backends: fd00:N0::/64 maps to 10.N0.0.0/24's behaviour.
            let o = match (o, addr[1]) {
                ([0xfd, 0, 0, 0x50], 0) => [10, 50, 0, 0],
                ([0xfd, 0, 0, 0x60], 0) => [10, 60, 0, 0],
                ([0xfd, 0, 0, 0x70], 0) => [10, 70, 0, 0],
                _ => o,
            };
            let routed = o[0] == 10 && matches!(o[1..3], [50, 0] | [60, 0] | [70, 0]);
            if routed && tot_len > MTU {
                return ModelNextHop::TooBig { mtu: MTU };
            }
            match o {
                [10, 50, 0, _] => ModelNextHop::Resolved {
                    smac: LB_MAC,
                    dmac: ROUTER_MAC,
                    ifindex: lb0,
                },
                [10, 60, 0, _] => ModelNextHop::Resolved {
                    smac: LB1_MAC,
                    dmac: LB1_PEER_MAC,
                    ifindex: lb1,
                },
                [10, 70, 0, _] => ModelNextHop::NoNeighbour,
                _ => ModelNextHop::NoRoute,
            }
        }
    }

    /// Installs (or replaces) a VIP in the kernel and the model alike.
    pub fn add_vip(
        &mut self,
        key: VipKey,
        vip_id: u32,
        backends: &[BackendSpec],
        size: u32,
    ) -> VipMeta {
        self.add_vip_with_flags(key, vip_id, 0, backends, size)
    }

    /// `add_vip` with `VipMeta::flags` (GUE).
    pub fn add_vip_with_flags(
        &mut self,
        key: VipKey,
        vip_id: u32,
        flags: u32,
        backends: &[BackendSpec],
        size: u32,
    ) -> VipMeta {
        let seed = self.model.settings.hash_seed;
        let previous = self.model.vips.get(&key).copied();
        let meta = if backends.iter().all(|b| b.weight == 0) && backends.is_empty() {
            let meta = VipMeta {
                vip_id,
                flags,
                table_offset: 0,
                table_size: 0,
            };
            self.dp.set_vip(key, meta).unwrap();
            meta
        } else {
            install_vip(
                &mut self.dp,
                &mut self.alloc,
                key,
                VipMeta {
                    vip_id,
                    flags,
                    ..VipMeta::default()
                },
                backends,
                size,
                seed,
            )
            .unwrap()
        };
        if let Some(old) = previous {
            self.alloc.release(old.table_offset, old.table_size);
        }
        for b in backends {
            self.model
                .backends
                .insert(b.id, Backend::new(b.addr, BACKEND_F_VALID, vip_id));
        }
        let table = if meta.table_size == 0 {
            Vec::new()
        } else {
            maglev_ids(backends, size, seed).unwrap()
        };
        for (i, id) in table.iter().enumerate() {
            self.model.slots.insert(meta.table_offset + i as u32, *id);
        }
        self.model.vips.insert(key, meta);
        // Fragment and address keys follow the control plane's rule.
        let keys: Vec<VipKey> = self.model.vips.keys().copied().collect();
        for (derived, owner) in derived_keys(&keys) {
            let owner_meta = self.model.vips[&owner];
            if self.model.vips.get(&derived) != Some(&owner_meta) {
                self.dp.set_vip(derived, owner_meta).unwrap();
                self.model.vips.insert(derived, owner_meta);
            }
        }
        self.assert_vips_by_id_mirrors_vips();
        meta
    }

    /// Checks that the kernel's `VIPS_BY_ID` is what the fast path assumes:
    /// each VIP's own (port) key and meta in `VIPS`, by its id, and nothing
    /// else (nothing to check for an older program without it: a baseline).
    pub fn assert_vips_by_id_mirrors_vips(&self) {
        if !self.dp.has_vips_by_id() {
            return;
        }
        let mut wanted: Vec<(u32, VipById)> = self
            .dp
            .vip_entries()
            .into_iter()
            .filter(|(k, _)| k.kind == lb_common::maps::VIP_KIND_PORT)
            .map(|(key, meta)| (meta.vip_id, VipById { key, meta }))
            .collect();
        wanted.sort_by_key(|(id, _)| *id);
        assert_eq!(self.dp.vips_by_id(), wanted, "VIPS_BY_ID mirrors VIPS");
    }

    /// Removes a VIP's key, and the fragment and address keys that no
    /// remaining VIP implies, as the control plane does.
    pub fn remove_vip(&mut self, key: VipKey) {
        self.dp.remove_vip(&key).unwrap();
        self.model.vips.remove(&key);
        let ports: Vec<VipKey> = self
            .model
            .vips
            .keys()
            .filter(|k| k.kind == lb_common::maps::VIP_KIND_PORT)
            .copied()
            .collect();
        let wanted: std::collections::BTreeMap<VipKey, VipKey> = derived_keys(&ports);
        let stale: Vec<VipKey> = self
            .model
            .vips
            .keys()
            .filter(|k| k.kind != lb_common::maps::VIP_KIND_PORT && !wanted.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            self.dp.remove_vip(&k).unwrap();
            self.model.vips.remove(&k);
        }
        self.assert_vips_by_id_mirrors_vips();
    }

    /// Gives VIP `vip_id` a previous table (second chance) built from
    /// `backends`, in the kernel and the model alike; backends not known
    /// yet are written as retired (removed from the VIP, address kept).
    pub fn set_prev_table(&mut self, vip_id: u32, backends: &[BackendSpec], size: u32) {
        let table = maglev_ids(backends, size, self.model.settings.hash_seed).unwrap();
        let offset = self
            .alloc
            .allocate(size)
            .expect("room for a previous table");
        self.dp.write_slots(offset, &table).unwrap();
        for (i, id) in table.iter().enumerate() {
            self.model.slots.insert(offset + i as u32, *id);
        }
        for b in backends {
            if !self.model.backends.contains_key(&b.id) {
                let retired = Backend::new(b.addr, BACKEND_F_RETIRED, vip_id);
                self.dp.set_backend(b.id, retired).unwrap();
                self.model.backends.insert(b.id, retired);
            }
        }
        let t = PrevTable { offset, size };
        self.dp.set_prev_table(vip_id, t).unwrap();
        self.model.prev_tables.insert(vip_id, t);
    }

    /// Routes a QUIC VIP's server id to a backend, in the kernel and the
    /// model alike.
    pub fn set_quic_server(&mut self, vip_id: u32, server_id: u32, backend_id: u32) {
        let key = QuicServerKey { vip_id, server_id };
        self.dp.set_quic_server(key, backend_id).unwrap();
        self.model.quic_servers.insert(key, backend_id);
    }

    /// Fails or restores a backend (its other flags, the family, stay).
    pub fn set_backend_valid(&mut self, id: u32, valid: bool) {
        let mut b = self.dp.backend(id).unwrap();
        b.flags = if valid {
            b.flags | BACKEND_F_VALID
        } else {
            b.flags & !BACKEND_F_VALID
        };
        self.dp.set_backend(id, b).unwrap();
        self.model.backends.get_mut(&id).unwrap().flags = b.flags;
    }

    fn counters(&self) -> Vec<Counter> {
        self.dp
            .reason_counters()
            .into_iter()
            .map(|(_, c)| c)
            .collect()
    }

    /// Like `send`, but leaves the counters to `assert_counters` (the
    /// differential fuzzer checks them in batches: a syscall per counter per
    /// packet would dominate its run time).
    pub fn send_batched(&mut self, pkt: &[u8]) -> Outcome {
        let flow = match parse(pkt) {
            ModelParse::Ip(p) => Some(p.flow),
            _ => None,
        };
        if let Some(flow) = &flow {
            self.sync_conntrack_entry(flow);
        }
        let model = self.model.decide(pkt, self.lb0, self.next_hop(), None);
        let kernel = self.dp.test_run(pkt, self.lb0).expect("test run");
        let ctx = format!("packet {}\nmodel {:?}", hex(pkt), model);
        assert_eq!(
            kernel.action,
            model.action.xdp_code(),
            "XDP action differs\n{ctx}"
        );
        assert_eq!(kernel.packet, model.output, "output bytes differ\n{ctx}");
        for r in &model.reasons {
            self.expected[*r as usize].packets += 1;
            self.expected[*r as usize].bytes += pkt.len() as u64;
        }
        self.model.apply(&model, 0);
        if let Some(flow) = flow {
            self.assert_conntrack_agrees(&flow, &ctx);
        }
        Outcome { kernel, model }
    }

    /// Every reason counter equals what the model predicted so far.
    pub fn assert_counters(&self) {
        assert_eq!(
            self.counters(),
            self.expected,
            "reason counters differ from the model's"
        );
    }

    /// Runs `pkt` through the kernel and the model; asserts they agree on
    /// action, output bytes, every counter and the connection table.
    /// (Counters are compared with everything sent through `send` and
    /// `send_batched` so far: frames run with `dp.test_run` directly are
    /// not accounted for.)
    pub fn send(&mut self, pkt: &[u8]) -> Outcome {
        // The model's answer first, only to know which VIP and backend
        // counters to watch; send_batched decides again and compares.
        if let ModelParse::Ip(p) = parse(pkt) {
            self.sync_conntrack_entry(&p.flow);
        }
        let predicted = self.model.decide(pkt, self.lb0, self.next_hop(), None);
        let vip_before = predicted.vip_id.map(|v| self.dp.vip_counter(v));
        let backend_before = predicted.backend_id.map(|b| self.dp.backend_counter(b));
        let new_flows_before = predicted.backend_id.map(|b| self.dp.backend_new_flows(b));
        let out = self.send_batched(pkt);
        self.assert_counters();
        let ctx = format!("packet {}\nmodel {:?}", hex(pkt), out.model);
        if let (Some(v), Some(b)) = (out.model.vip_id, vip_before) {
            assert_eq!(
                self.dp.vip_counter(v).packets,
                b.packets + 1,
                "VIP counter\n{ctx}"
            );
        }
        if let (Some(id), Some(b)) = (out.model.backend_id, backend_before) {
            let now = self.dp.backend_counter(id);
            assert_eq!(
                (now.packets, now.bytes),
                (b.packets + 1, b.bytes + pkt.len() as u64),
                "backend counter\n{ctx}"
            );
        }
        if let (Some(id), Some(b)) = (out.model.backend_id, new_flows_before) {
            // A flow recorded with one hop is a new flow of its backend.
            let new =
                out.model.conntrack_write.is_some() && out.model.conntrack_write_second.is_none();
            assert_eq!(
                self.dp.backend_new_flows(id).packets,
                b.packets + u64::from(new),
                "backend new-flow counter\n{ctx}"
            );
        }
        out
    }

    /// The LRU may evict an entry at any time (each CPU's list holds a
    /// share of the table): take the kernel's view of this flow's entry as
    /// the model's input, so an eviction is not mistaken for a mismatch.
    fn sync_conntrack_entry(&mut self, flow: &FlowKey) {
        match self.dp.conntrack_get(flow) {
            Some(entry) => {
                self.model.conntrack.insert(*flow, entry);
            }
            None => {
                self.model.conntrack.remove(flow);
            }
        }
    }

    fn assert_conntrack_agrees(&self, flow: &FlowKey, ctx: &str) {
        let kernel = self
            .dp
            .conntrack_get(flow)
            .map(|e| (e.backend_id, e.second_hop()));
        let model = self
            .model
            .conntrack
            .get(flow)
            .map(|e| (e.backend_id, e.second_hop()));
        assert_eq!(kernel, model, "connection table entry differs\n{ctx}");
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn v4(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

pub fn backend(id: u32, addr: [u8; 4], weight: u32) -> BackendSpec {
    BackendSpec {
        id,
        addr: IpAddr::V4(v4(addr)),
        weight,
    }
}

/// A `VipMeta` with only the id set (for `install_vip`).
pub fn vip_meta(vip_id: u32) -> VipMeta {
    VipMeta {
        vip_id,
        ..VipMeta::default()
    }
}

/// An IPv6 backend: `fd00:<net>::<host>` (net 0x50, 0x60, 0x70 as the
/// IPv4 10.50/10.60/10.70 networks).
pub fn backend6(id: u32, net: u16, host: u16, weight: u32) -> BackendSpec {
    BackendSpec {
        id,
        addr: IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, net, 0, 0, 0, 0, 0, host)),
        weight,
    }
}
