//! The only code that touches the XDP program's maps. Everything above it
//! speaks in `lb_common::maps` types.

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, ProgramArray},
    programs::{
        TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    maps::{
        BENCH_FRAME_LEN, Backend, CONTROL_TABLE_GENERATION, CaptureFilter, ConnEntry, Counter,
        DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAGLEV_SLOTS, FlowKey, GLOBAL_SETTINGS,
        MAP_ANY_PORT_VIPS, MAP_BACKEND_NEW_FLOWS, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_BENCH_FRAME,
        MAP_BENCH_NEXT, MAP_CAPTURE, MAP_CAPTURE_LOST, MAP_CAPTURE_RING, MAP_CONNTRACK,
        MAP_CONTROL_STATE, MAP_MAGLEV_SLOTS, MAP_NEXTHOP_CACHE, MAP_PREV_TABLES, MAP_QUIC_SERVERS,
        MAP_REASON_STATS, MAP_VIP_ADDR_FILTER, MAP_VIP_STATS, MAP_VIPS, MAP_VIPS_BY_ID,
        MAX_BACKENDS, MAX_VIPS, PROGRAM_BALANCER, PROGRAM_BENCH_GEN, PROGRAM_PASS, PrevTable,
        QuicServerKey, Reason, VIP_ADDR_FILTER_WORDS, VIP_KIND_PORT, VipById, VipKey, VipMeta,
        vip_addr_filter_bit,
    },
    settings::Settings,
};

use crate::{
    object::ebpf_object,
    slot_table::SlotTable,
    slots_mmap::{SlotsMmap, read_unpacked_pin, replace_pin, slots_per_element},
    xdp_mode::Chosen,
};

/// How `attach_pinned` attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new link (nothing was pinned for the interface).
    Fresh,
    /// The program replaced on the pinned link: no moment without XDP.
    Replaced,
    /// The pinned link was removed and a new one attached: its mode
    /// changed, or its interface had been deleted.
    Reattached { was: String },
}

/// Attaches `program` to `interface`, its link pinned in `dir` as
/// `<prefix>_<interface>@<mode>`: a pinned link of the same mode (or of
/// an unknown mode: pinned by an older lbd as `<prefix>_<interface>`) is
/// taken over by replacing its program atomically; one of another mode,
/// or one the kernel severed (its interface was deleted), is detached and
/// unpinned, and the program attached anew.
pub fn attach_pinned_program(
    program: &mut Xdp,
    dir: &Path,
    prefix: &str,
    interface: &str,
    chosen: &Chosen,
    attached: &mut Vec<XdpLinkId>,
) -> Result<Attached> {
    let wanted = dir.join(format!("{prefix}_{interface}@{}", chosen.name));
    let legacy = format!("{prefix}_{interface}");
    let at = format!("{prefix}_{interface}@");
    let mut pinned: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                .filter(|(n, _)| *n == legacy || n.starts_with(&at))
                .collect()
        })
        .unwrap_or_default();
    // The wanted name first: it is the one to take over.
    pinned.sort_by_key(|(_, p)| *p != wanted);
    let mut outcome = Attached::Fresh;
    for (name, path) in pinned {
        let same_mode = path == wanted || name == legacy;
        if same_mode && matches!(outcome, Attached::Fresh) {
            match replace_on_pinned(program, &path) {
                Ok(id) => {
                    attached.push(id);
                    if name == legacy && chosen.name != "auto" {
                        tracing::warn!(
                            interface,
                            "the pinned link's mode is unknown (pinned by an older lbd): kept as it is; `lbd teardown` and a start attach in the configured mode"
                        );
                    }
                    outcome = Attached::Replaced;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(
                        interface,
                        "pinned link unusable, attaching anew (maps kept): {e:#}"
                    );
                    outcome = Attached::Reattached {
                        was: "a severed link (interface deleted)".into(),
                    };
                }
            }
        } else if !same_mode {
            outcome = Attached::Reattached {
                was: name.trim_start_matches(&at).to_string(),
            };
        } else {
            continue;
        }
        // Detached now (the kernel frees an unpinned link only after an
        // RCU grace period, and the new attach would find it still
        // there), then unpinned.
        detach_pinned_link(&path);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    if matches!(outcome, Attached::Replaced) {
        return Ok(outcome);
    }
    // A link just detached may still hold the hook for a moment.
    let mut tries = 0;
    let id = loop {
        match program.attach(interface, chosen.mode) {
            Ok(id) => break id,
            Err(e) if tries < 20 && format!("{e:?}").contains("File exists") => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("attaching XDP to {interface} in {} mode", chosen.name)
                });
            }
        }
    };
    let link = program.take_link(id)?;
    let fd_link =
        FdLink::try_from(link).context("this kernel gave no bpf_link for XDP (needs 5.9+)")?;
    fd_link
        .pin(&wanted)
        .with_context(|| format!("pinning {}", wanted.display()))?;
    Ok(outcome)
}

fn replace_on_pinned(program: &mut Xdp, path: &Path) -> Result<XdpLinkId> {
    let pinned = PinnedLink::from_pin(path).context("opening the pinned link")?;
    let link = XdpLink::try_from(FdLink::from(pinned)).context("pinned link is not an XDP link")?;
    program
        .attach_to_link(link)
        .context("replacing the program on the pinned link")
}

/// Detaches the bpf_link pinned at `path` from its hook at once
/// (BPF_OBJ_GET, then BPF_LINK_DETACH, kernel 5.9+). Best effort: a
/// severed link has nothing to detach.
fn detach_pinned_link(path: &Path) {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // union bpf_attr, zeroed; obj_get: pathname (u64) first.
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64;
    // SAFETY: bpf(2) with a zeroed attr of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return;
    }
    let mut attr = [0u64; 16];
    attr[0] = fd as u64; // link_detach.link_fd (u32, little end first)
    // SAFETY: as above; `fd` is ours and closed right after.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        );
        libc::close(fd as i32);
    }
}

/// A VIP key's bit in `VIP_ADDR_FILTER`.
fn filter_bit(key: &VipKey) -> u32 {
    vip_addr_filter_bit(&key.addr, key.family)
}

/// The balancer program of a loaded object (checked when it was loaded).
fn balancer(ebpf: &mut Ebpf) -> &mut Xdp {
    ebpf.program_mut(PROGRAM_BALANCER)
        .expect("checked at load")
        .try_into()
        .expect("checked at load")
}

/// The interface's index in this network namespace, if it exists.
pub fn ifindex_of(interface: &str) -> Option<u32> {
    let c = std::ffi::CString::new(interface).ok()?;
    // SAFETY: valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// Sizes and settings fixed when the program is loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub settings: Settings,
    /// Capacity of `MAGLEV_SLOTS` (all VIPs' tables, twice over for swaps).
    pub maglev_slots: u32,
    pub conntrack_entries: u32,
    /// Sizes of the per-VIP and per-backend maps (`lb.max_vips`,
    /// `lb.max_backends`).
    pub max_vips: u32,
    pub max_backends: u32,
    /// bpffs directory to pin maps and links in, so the data plane outlives
    /// the daemon and a new daemon adopts it. `None`: nothing pinned.
    pub pin_path: Option<PathBuf>,
    /// Another build's XDP object instead of the embedded one (A/B
    /// benchmarks against an older program; see `load_object_file`).
    pub object: Option<&'static [u8]>,
}

/// Reads an XDP object file for `LoadOptions::object`, 8-byte aligned (as
/// the ELF parser wants) and kept for the life of the process.
pub fn load_object_file(path: &Path) -> Result<&'static [u8]> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let words = vec![0u64; bytes.len().div_ceil(8)];
    let aligned: &'static mut [u64] = words.leak();
    // SAFETY: u64 storage viewed as bytes, of at least bytes.len() bytes.
    let view =
        unsafe { std::slice::from_raw_parts_mut(aligned.as_mut_ptr().cast::<u8>(), bytes.len()) };
    view.copy_from_slice(&bytes);
    Ok(view)
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            settings: Settings::DEFAULT,
            maglev_slots: DEFAULT_MAGLEV_SLOTS,
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
            max_vips: MAX_VIPS,
            max_backends: MAX_BACKENDS,
            pin_path: None,
            object: None,
        }
    }
}

/// The per-VIP and per-backend maps and their sizes for `max_vips` VIPs
/// and `max_backends` backend ids. `VIPS` holds up to three keys per VIP
/// (its own, its address's fragment key and its address key).
pub fn map_sizes(max_vips: u32, max_backends: u32) -> [(&'static str, u32); 9] {
    [
        (MAP_VIPS, max_vips.saturating_mul(3)),
        // These three are indexed by VIP id, and id 0 is never used: ids 1..=max_vips.
        (MAP_VIPS_BY_ID, max_vips.saturating_add(1)),
        (MAP_PREV_TABLES, max_vips.saturating_add(1)),
        (MAP_VIP_STATS, max_vips.saturating_add(1)),
        (MAP_BACKENDS, max_backends),
        (MAP_BACKEND_STATS, max_backends),
        (MAP_BACKEND_NEW_FLOWS, max_backends),
        (MAP_NEXTHOP_CACHE, max_backends),
        (MAP_QUIC_SERVERS, max_backends),
    ]
}

/// The size `map_sizes` gives map `name`, if it sizes that map.
pub fn map_size(max_vips: u32, max_backends: u32, name: &str) -> Option<u32> {
    map_sizes(max_vips, max_backends)
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, entries)| entries)
}

/// Maps that carry state across daemon restarts.
pub const PINNED_MAPS: [&str; 18] = [
    MAP_VIPS,
    MAP_VIPS_BY_ID,
    MAP_QUIC_SERVERS,
    MAP_CONTROL_STATE,
    MAP_PREV_TABLES,
    MAP_VIP_ADDR_FILTER,
    MAP_ANY_PORT_VIPS,
    MAP_BACKENDS,
    MAP_MAGLEV_SLOTS,
    MAP_CONNTRACK,
    MAP_REASON_STATS,
    MAP_VIP_STATS,
    MAP_BACKEND_STATS,
    MAP_BACKEND_NEW_FLOWS,
    MAP_CAPTURE,
    MAP_CAPTURE_LOST,
    MAP_CAPTURE_RING,
    MAP_NEXTHOP_CACHE,
];

/// Removes everything pinned under `pin_path`: links (which detaches the
/// program from its interfaces) and maps (freed once nothing uses them).
/// Refuses while an lbd runs on this path (it would go on driving removed maps).
pub fn teardown(pin_path: &Path) -> Result<Vec<String>> {
    if !pin_path.exists() {
        return Ok(Vec::new());
    }
    let _lock = crate::instance_lock::lock(pin_path, "pin path")?;
    remove_pinned(pin_path)
}

/// Removes what is pinned under `pin_path`; the caller holds its lock.
pub fn remove_pinned(pin_path: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(pin_path) else {
        return Ok(removed);
    };
    for entry in entries.flatten() {
        std::fs::remove_file(entry.path())
            .with_context(|| format!("removing {}", entry.path().display()))?;
        removed.push(entry.file_name().to_string_lossy().into_owned());
    }
    std::fs::remove_dir(pin_path).ok();
    removed.sort();
    Ok(removed)
}

use std::os::fd::AsFd;

/// The loaded program and typed handles to its maps.
pub struct Dataplane {
    slots: SlotsMmap,
    vips: HashMap<MapData, VipKey, VipMeta>,
    /// `VIP_ADDR_FILTER`, kept equal to the bits of `vip_keys`' addresses
    /// (absent from an older build's object, loaded for an A/B benchmark).
    addr_filter: Option<Array<MapData, u64>>,
    /// Every key in `VIPS` (so the filter is maintained without reading it).
    vip_keys: std::collections::BTreeSet<VipKey>,
    /// Keys per filter bit, and the words as written: a key added or
    /// removed touches its own bit only (recomputing the word from every
    /// key was quadratic in the number of VIPs).
    filter_counts: std::collections::HashMap<u32, u32>,
    filter_words: Vec<u64>,
    any_port_vips: Array<MapData, u32>,
    /// `PREV_TABLES` (absent from programs older than second chance, which
    /// benchmarks load as baselines).
    prev_tables: Option<Array<MapData, PrevTable>>,
    /// `VIPS`' port keys by vip id (absent in programs built before it).
    vips_by_id: Option<Array<MapData, VipById>>,
    /// `QUIC_SERVERS` (absent from older builds' objects).
    quic_servers: Option<HashMap<MapData, QuicServerKey, u32>>,
    /// `CONTROL_STATE` (absent from older builds' objects).
    control_state: Option<Array<MapData, u64>>,
    /// `CAPTURE`'s filter and `CAPTURE_LOST` (absent from older builds' objects).
    capture: Option<Array<MapData, CaptureFilter>>,
    capture_lost: Option<PerCpuArray<MapData, u64>>,
    backends: Array<MapData, Backend>,
    conntrack: HashMap<MapData, FlowKey, ConnEntry>,
    /// A duplicate of the connection table's fd, to read its fdinfo.
    conntrack_fd: std::os::fd::OwnedFd,
    reason_stats: PerCpuArray<MapData, Counter>,
    vip_stats: PerCpuArray<MapData, Counter>,
    backend_stats: PerCpuArray<MapData, Counter>,
    /// `BACKEND_NEW_FLOWS` (absent from older builds' objects).
    backend_new_flows: Option<PerCpuArray<MapData, Counter>>,
    ebpf: Ebpf,
    attached: Vec<XdpLinkId>,
    /// Interface -> its ifindex when attached (a new index: recreated).
    ifindexes: std::collections::BTreeMap<String, u32>,
    pin_path: Option<PathBuf>,
    /// True when the maps were found pinned (a previous daemon's state).
    pub adopted: bool,
    /// VIP ids and backend ids the maps hold (as loaded: pinned maps keep
    /// the sizes they were created with).
    pub vip_capacity: u32,
    pub backend_capacity: u32,
}

/// Counter maps indexed by an enum that has grown since they were pinned
/// (an older lbd's): unpinned, so that this load creates them at the size
/// the program indexes. Only counters are lost (they restart from zero).
fn drop_outgrown_pins(dir: &Path) {
    for (name, wanted) in [(MAP_REASON_STATS, Reason::COUNT)] {
        let path = dir.join(name);
        let Ok(map) = MapData::from_pin(&path) else {
            continue;
        };
        let Ok(info) = map.info() else { continue };
        if info.max_entries() < wanted {
            tracing::warn!(
                map = name,
                pinned = info.max_entries(),
                wanted,
                "pinned counter map is smaller than this program needs: recreated (its counters restart)"
            );
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// `max_entries` of a map of the loaded object.
fn max_entries_of(ebpf: &Ebpf, name: &str) -> Option<u32> {
    let data = match ebpf.map(name)? {
        Map::Array(d) | Map::PerCpuArray(d) | Map::HashMap(d) | Map::LruHashMap(d) => d,
        _ => return None,
    };
    data.info().ok().map(|i| i.max_entries())
}

/// Slots per `MAGLEV_SLOTS` element in `object`: two in this build's,
/// one in older builds' (loaded as benchmark baselines).
fn object_slots_per_element(object: &[u8]) -> Result<u32> {
    let parsed = aya_obj::Object::parse(object).context("parsing the XDP object")?;
    let map = parsed
        .maps
        .get(MAP_MAGLEV_SLOTS)
        .context("MAGLEV_SLOTS missing from the object")?;
    slots_per_element(map.value_size())
}

/// One `BPF_PROG_TEST_RUN` result.
#[derive(Clone, Debug)]
pub struct TestRunOutput {
    pub action: u32,
    pub packet: Vec<u8>,
    pub duration: Duration,
}

fn take<T: TryFrom<Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// The length of the host's jiffy: the resolution of the coarse clock,
/// which advances once a tick (4 ms at HZ = 250).
pub fn host_tick_ns() -> u64 {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes one timespec.
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } != 0 {
        return 4_000_000;
    }
    (res.tv_sec as u64 * 1_000_000_000 + res.tv_nsec as u64).max(1)
}

impl Dataplane {
    /// Loads the program (verifier included) without attaching it.
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let object = match opts.object {
            Some(o) => o,
            None => ebpf_object()?,
        };
        let settings = opts.settings.with_tick(host_tick_ns());
        // Slots pinned by an lbd whose program held one per element: this
        // load creates the map in this program's layout and copies them in.
        let unpacked = match &opts.pin_path {
            Some(dir) if dir.join(MAP_VIPS).exists() => read_unpacked_pin(dir)?,
            _ => None,
        };
        let wanted_slots = opts
            .maglev_slots
            .max(unpacked.as_ref().map_or(0, |s| s.len() as u32));
        let mut loader = EbpfLoader::new();
        loader
            .override_global(GLOBAL_SETTINGS, &settings, true)
            .map_max_entries(
                MAP_MAGLEV_SLOTS,
                wanted_slots.div_ceil(object_slots_per_element(object)?),
            )
            .map_max_entries(MAP_CONNTRACK, opts.conntrack_entries);
        for (name, entries) in map_sizes(opts.max_vips, opts.max_backends) {
            loader.map_max_entries(name, entries);
        }
        let mut adopted = false;
        let pins: Vec<(&str, PathBuf)> = match &opts.pin_path {
            Some(dir) => {
                ensure_bpffs(dir)?;
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                adopted = dir.join(MAP_VIPS).exists();
                drop_outgrown_pins(dir);
                PINNED_MAPS.iter().map(|m| (*m, dir.join(m))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pins {
            if *name == MAP_MAGLEV_SLOTS && unpacked.is_some() {
                continue;
            }
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).context("loading the XDP object")?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_BALANCER)
            .context("program missing from the object")?
            .try_into()?;
        program
            .load()
            .context("the kernel verifier rejected the XDP program")?;
        let slots_map: MapData = {
            let map = ebpf
                .take_map(MAP_MAGLEV_SLOTS)
                .context("MAGLEV_SLOTS missing")?;
            match map {
                Map::Array(data) => data,
                _ => bail!("MAGLEV_SLOTS is not an array"),
            }
        };
        // A pinned map keeps the size (and layout) it was created with.
        let mut slots = SlotsMmap::new(&slots_map)?;
        if let (Some(ids), Some(dir)) = (&unpacked, &opts.pin_path) {
            slots.write(0, ids);
            replace_pin(&slots_map, dir)?;
            tracing::warn!(
                slots = ids.len(),
                "MAGLEV_SLOTS was pinned with one slot per element (an older lbd's): \
                 its tables are copied into a new map of two slots per element"
            );
        }
        let conntrack_fd = match ebpf.map(MAP_CONNTRACK) {
            Some(Map::LruHashMap(data)) => data.fd().as_fd().try_clone_to_owned()?,
            _ => bail!("CONNTRACK is not an LRU hash"),
        };
        // The mapping keeps the map alive; the fd can go.
        drop(slots_map);
        let vip_capacity = max_entries_of(&ebpf, MAP_VIP_STATS).unwrap_or(opts.max_vips);
        let backend_capacity = max_entries_of(&ebpf, MAP_BACKENDS).unwrap_or(opts.max_backends);
        let vips: HashMap<MapData, VipKey, VipMeta> = take(&mut ebpf, MAP_VIPS)?;
        let vip_keys = vips.keys().filter_map(|k| k.ok()).collect();
        let mut dp = Dataplane {
            slots,
            vips,
            addr_filter: ebpf
                .map(MAP_VIP_ADDR_FILTER)
                .is_some()
                .then(|| take(&mut ebpf, MAP_VIP_ADDR_FILTER))
                .transpose()?,
            vip_keys,
            filter_counts: Default::default(),
            filter_words: vec![0; VIP_ADDR_FILTER_WORDS as usize],
            any_port_vips: take(&mut ebpf, MAP_ANY_PORT_VIPS)?,
            vips_by_id: ebpf
                .map(MAP_VIPS_BY_ID)
                .is_some()
                .then(|| take(&mut ebpf, MAP_VIPS_BY_ID))
                .transpose()?,
            prev_tables: ebpf
                .map(MAP_PREV_TABLES)
                .is_some()
                .then(|| take(&mut ebpf, MAP_PREV_TABLES))
                .transpose()?,
            quic_servers: ebpf
                .map(MAP_QUIC_SERVERS)
                .is_some()
                .then(|| take(&mut ebpf, MAP_QUIC_SERVERS))
                .transpose()?,
            capture: ebpf
                .map(MAP_CAPTURE)
                .is_some()
                .then(|| take(&mut ebpf, MAP_CAPTURE))
                .transpose()?,
            capture_lost: ebpf
                .map(MAP_CAPTURE_LOST)
                .is_some()
                .then(|| take(&mut ebpf, MAP_CAPTURE_LOST))
                .transpose()?,
            control_state: ebpf
                .map(MAP_CONTROL_STATE)
                .is_some()
                .then(|| take(&mut ebpf, MAP_CONTROL_STATE))
                .transpose()?,
            backends: take(&mut ebpf, MAP_BACKENDS)?,
            conntrack_fd,
            conntrack: take(&mut ebpf, MAP_CONNTRACK)?,
            reason_stats: take(&mut ebpf, MAP_REASON_STATS)?,
            vip_stats: take(&mut ebpf, MAP_VIP_STATS)?,
            backend_stats: take(&mut ebpf, MAP_BACKEND_STATS)?,
            backend_new_flows: ebpf
                .map(MAP_BACKEND_NEW_FLOWS)
                .is_some()
                .then(|| take(&mut ebpf, MAP_BACKEND_NEW_FLOWS))
                .transpose()?,
            ebpf,
            attached: Vec::new(),
            ifindexes: Default::default(),
            pin_path: opts.pin_path.clone(),
            adopted,
            vip_capacity,
            backend_capacity,
        };
        // Adopted VIPs (perhaps pinned by an lbd that had no filter yet):
        // every word written before the program can run.
        let bits: Vec<u32> = dp.vip_keys.iter().map(filter_bit).collect();
        for bit in bits {
            *dp.filter_counts.entry(bit).or_insert(0) += 1;
            dp.filter_words[(bit >> 6) as usize] |= 1 << (bit & 63);
        }
        for word in 0..VIP_ADDR_FILTER_WORDS {
            dp.set_filter_word(word, dp.filter_words[word as usize])?;
        }
        dp.rebuild_vips_by_id()?;
        Ok(dp)
    }

    /// Counts `key` in (`added`) or out of its filter bit, and writes the
    /// bit's word when the bit changes.
    fn update_filter_word(&mut self, key: &VipKey, added: bool) -> Result<()> {
        let bit = filter_bit(key);
        let count = self.filter_counts.entry(bit).or_insert(0);
        if added {
            *count += 1;
        } else {
            *count = count.saturating_sub(1);
        }
        let set = *count > 0;
        if !set {
            self.filter_counts.remove(&bit);
        }
        let word = bit >> 6;
        let old = self.filter_words[word as usize];
        let new = if set {
            old | 1 << (bit & 63)
        } else {
            old & !(1 << (bit & 63))
        };
        if new != old {
            self.filter_words[word as usize] = new;
            self.set_filter_word(word, new)?;
        }
        Ok(())
    }

    fn set_filter_word(&mut self, word: u32, value: u64) -> Result<()> {
        match self.addr_filter.as_mut() {
            Some(filter) => filter
                .set(word, value, 0)
                .context("writing VIP_ADDR_FILTER"),
            None => Ok(()),
        }
    }

    /// Attaches to `interface` in `chosen` mode. With a pin path, the link
    /// is pinned (`link_<interface>@<mode>`) so the program stays attached
    /// after the daemon exits. A pinned link of the same mode is taken over
    /// by replacing its program atomically (no moment without XDP). One of
    /// another mode is removed and the program attached anew in the chosen
    /// mode; so is one the kernel severed (its interface was deleted). The
    /// maps, and so the connection table, are kept in every case.
    pub fn attach_pinned(&mut self, interface: &str, chosen: &Chosen) -> Result<Attached> {
        let ifindex = ifindex_of(interface)
            .with_context(|| format!("interface {interface} does not exist"))?;
        let Some(dir) = self.pin_path.clone() else {
            self.attach(interface, chosen.mode)?;
            self.ifindexes.insert(interface.to_string(), ifindex);
            return Ok(Attached::Fresh);
        };
        let how = attach_pinned_program(
            balancer(&mut self.ebpf),
            &dir,
            "link",
            interface,
            chosen,
            &mut self.attached,
        )?;
        self.ifindexes.insert(interface.to_string(), ifindex);
        Ok(how)
    }

    /// The ifindex `interface` had when the program was attached to it.
    pub fn attached_ifindex(&self, interface: &str) -> Option<u32> {
        self.ifindexes.get(interface).copied()
    }

    /// Forgets the attachment to an interface that is gone.
    pub fn forget_interface(&mut self, interface: &str) {
        self.ifindexes.remove(interface);
    }

    /// Every `VIPS` entry (for adopting pinned state).
    pub fn vip_entries(&self) -> Vec<(VipKey, VipMeta)> {
        self.vips.iter().filter_map(|r| r.ok()).collect()
    }

    /// Every written `BACKENDS` entry with its id.
    pub fn backend_entries(&self) -> Vec<(u32, Backend)> {
        (1..self.backend_capacity)
            .filter_map(|id| self.backends.get(&id, 0).ok().map(|b| (id, b)))
            .filter(|(_, b)| b.vip_id != 0)
            .collect()
    }

    /// Deletes every connection-table entry naming backend `id`.
    pub fn forget_flows_of(&mut self, id: u32) -> Result<u64> {
        let stale: Vec<FlowKey> = self
            .conntrack
            .iter()
            .filter_map(|r| r.ok())
            // Also entries that name it as their recorded second hop.
            .filter(|(_, e)| e.backend_id == id || e.second_hop() == id)
            .map(|(k, _)| k)
            .collect();
        for key in &stale {
            // An entry the LRU evicted meanwhile is fine to miss.
            let _ = self.conntrack.remove(key);
        }
        Ok(stale.len() as u64)
    }

    /// Tracked flows per backend id (walks the whole connection table).
    /// A second handle of the connection table (its own file descriptor),
    /// for walking it on another thread.
    pub fn conntrack_handle(&self) -> Result<HashMap<MapData, FlowKey, ConnEntry>> {
        let data = MapData::from_fd(self.conntrack_fd.try_clone()?)?;
        Ok(HashMap::try_from(Map::LruHashMap(data))?)
    }

    /// One of the object's programs, loaded on first use.
    fn loaded(&mut self, name: &str) -> Result<&mut Xdp> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        if program.fd().is_err() {
            program
                .load()
                .with_context(|| format!("the kernel verifier rejected {name}"))?;
        }
        Ok(program)
    }

    fn program(&mut self) -> &mut Xdp {
        balancer(&mut self.ebpf)
    }

    /// Attaches to `interface`; detached again when `self` is dropped.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<()> {
        let id = self
            .program()
            .attach(interface, mode)
            .with_context(|| format!("attaching XDP to {interface} in {mode:?} mode"))?;
        self.attached.push(id);
        Ok(())
    }

    /// Writes a VIP entry; a new address gets its filter bit first, so the
    /// program never skips a VIP that exists. A VIP's own (port) key is
    /// copied to `VIPS_BY_ID` after `VIPS`, and taken from where its
    /// previous id had it.
    pub fn set_vip(&mut self, key: VipKey, meta: VipMeta) -> Result<()> {
        if self.vip_keys.insert(key) {
            self.update_filter_word(&key, true)?;
        }
        let previous = self.indexed(&key).then(|| self.vip(&key)).flatten();
        self.vips.insert(key, meta, 0).context("writing VIPS")?;
        if !self.indexed(&key) {
            return Ok(());
        }
        if let Some(old) = previous
            && old.vip_id != meta.vip_id
        {
            self.unindex_vip(old.vip_id, &key)?;
        }
        self.index_vip(VipById { key, meta })
    }

    /// Whether `key` is a VIP's own key, copied to `VIPS_BY_ID`.
    fn indexed(&self, key: &VipKey) -> bool {
        key.kind == VIP_KIND_PORT && self.vips_by_id.is_some()
    }

    /// `VIPS_BY_ID[entry.meta.vip_id] = entry`.
    fn index_vip(&mut self, entry: VipById) -> Result<()> {
        self.write_by_id(entry.meta.vip_id, entry)
    }

    /// Clears `VIPS_BY_ID[id]` if it holds `key`.
    fn unindex_vip(&mut self, id: u32, key: &VipKey) -> Result<()> {
        let Some(map) = self.vips_by_id.as_mut() else {
            return Ok(());
        };
        if map.get(&id, 0).is_ok_and(|e| e.key == *key) {
            map.set(id, VipById::default(), 0)
                .with_context(|| format!("clearing VIPS_BY_ID[{id}]"))?;
        }
        Ok(())
    }

    /// Writes `VIPS_BY_ID[id]` unless it already holds `entry`. An id that
    /// held another key is cleared first: a reader racing the writes then
    /// sees a mix of zeros and one key, never a mix of two keys.
    fn write_by_id(&mut self, id: u32, entry: VipById) -> Result<()> {
        let Some(map) = self.vips_by_id.as_mut() else {
            return Ok(());
        };
        let current = map.get(&id, 0).unwrap_or_default();
        if current == entry {
            return Ok(());
        }
        if current.key != entry.key && current != VipById::default() {
            map.set(id, VipById::default(), 0)
                .with_context(|| format!("clearing VIPS_BY_ID[{id}]"))?;
        }
        map.set(id, entry, 0)
            .with_context(|| format!("writing VIPS_BY_ID[{id}]"))
    }

    /// Makes `VIPS_BY_ID` a copy of `VIPS`' port keys: after loading, when
    /// the pinned `VIPS` may come from a program without it.
    fn rebuild_vips_by_id(&mut self) -> Result<()> {
        let Some(map) = self.vips_by_id.as_ref() else {
            return Ok(());
        };
        let capacity = map.len();
        let mut wanted = vec![VipById::default(); capacity as usize];
        for entry in self.vips.iter() {
            let (key, meta) = entry.context("reading VIPS")?;
            if key.kind == VIP_KIND_PORT && meta.vip_id < capacity {
                wanted[meta.vip_id as usize] = VipById { key, meta };
            }
        }
        for (id, entry) in (0..capacity).zip(wanted) {
            self.write_by_id(id, entry)?;
        }
        Ok(())
    }

    /// VIP `vip_id`'s previous table for second-chance forwarding.
    pub fn set_prev_table(&mut self, vip_id: u32, table: PrevTable) -> Result<()> {
        self.prev_tables
            .as_mut()
            .context("this XDP program has no PREV_TABLES (built before second chance)")?
            .set(vip_id, table, 0)
            .context("writing PREV_TABLES")
    }

    /// Routes a QUIC VIP's server id to backend `id`.
    pub fn set_quic_server(&mut self, key: QuicServerKey, id: u32) -> Result<()> {
        self.quic_servers
            .as_mut()
            .context("this XDP program has no QUIC_SERVERS (built before QUIC routing)")?
            .insert(key, id, 0)
            .context("writing QUIC_SERVERS")
    }

    pub fn remove_quic_server(&mut self, key: &QuicServerKey) -> Result<()> {
        let Some(map) = self.quic_servers.as_mut() else {
            return Ok(());
        };
        match map.remove(key) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing from QUIC_SERVERS"),
        }
    }

    /// Whether the program routes QUIC by server id (older builds do not).
    pub fn has_quic_routing(&self) -> bool {
        self.quic_servers.is_some()
    }

    /// Every `QUIC_SERVERS` entry (for adopting pinned state).
    pub fn quic_servers(&self) -> Vec<(QuicServerKey, u32)> {
        self.quic_servers
            .as_ref()
            .map(|m| m.iter().filter_map(|e| e.ok()).collect())
            .unwrap_or_default()
    }

    /// VIP `vip_id`'s previous table as the kernel has it (size 0: none).
    pub fn prev_table(&self, vip_id: u32) -> PrevTable {
        self.prev_tables
            .as_ref()
            .and_then(|m| m.get(&vip_id, 0).ok())
            .unwrap_or_default()
    }

    /// The table generation a previous daemon recorded (0: none).
    pub fn saved_generation(&self) -> u64 {
        self.control_state
            .as_ref()
            .and_then(|m| m.get(&CONTROL_TABLE_GENERATION, 0).ok())
            .unwrap_or(0)
    }

    /// Records the table generation for the next daemon.
    pub fn save_generation(&mut self, generation: u64) -> Result<()> {
        match self.control_state.as_mut() {
            Some(m) => m
                .set(CONTROL_TABLE_GENERATION, generation, 0)
                .context("writing CONTROL_STATE"),
            None => Ok(()),
        }
    }

    /// Sets the capture filter (`enabled` 0: off).
    pub fn set_capture(&mut self, filter: CaptureFilter) -> Result<()> {
        self.capture
            .as_mut()
            .context("this XDP program cannot capture (built before capture)")?
            .set(0, filter, 0)
            .context("writing CAPTURE")
    }

    /// The capture filter as the kernel has it.
    pub fn capture(&self) -> CaptureFilter {
        self.capture
            .as_ref()
            .and_then(|m| m.get(&0, 0).ok())
            .unwrap_or_default()
    }

    /// Capture records lost to a full ring, since the data plane was created.
    pub fn capture_lost(&self) -> u64 {
        self.capture_lost
            .as_ref()
            .and_then(|m| m.get(&0, 0).ok())
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    /// The bpffs path of the capture ring, when the data plane is pinned.
    pub fn capture_ring_path(&self) -> Option<PathBuf> {
        self.pin_path.as_ref().map(|d| d.join(MAP_CAPTURE_RING))
    }

    /// Whether the program does second-chance forwarding.
    pub fn has_second_chance(&self) -> bool {
        self.prev_tables.is_some()
    }

    /// Whether some VIP has port 0 (set before adding one, cleared after the
    /// last one is gone).
    pub fn set_any_port_vips(&mut self, on: bool) -> Result<()> {
        self.any_port_vips
            .set(0, on as u32, 0)
            .context("writing ANY_PORT_VIPS")
    }

    pub fn any_port_vips(&self) -> bool {
        self.any_port_vips.get(&0, 0).is_ok_and(|v| v != 0)
    }

    /// Removes a VIP entry, then its address's filter bit if no other key
    /// has that address.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        if self.indexed(key)
            && let Some(meta) = self.vip(key)
        {
            self.unindex_vip(meta.vip_id, key)?;
        }
        self.vips.remove(key).context("removing from VIPS")?;
        if self.vip_keys.remove(key) {
            self.update_filter_word(key, false)?;
        }
        Ok(())
    }

    pub fn vip(&self, key: &VipKey) -> Option<VipMeta> {
        self.vips.get(key, 0).ok()
    }

    /// Whether the program finds tracked flows' VIPs by id (older builds do not).
    pub fn has_vips_by_id(&self) -> bool {
        self.vips_by_id.is_some()
    }

    /// `VIPS_BY_ID`'s entries that are not zero, by vip id (empty for a
    /// program without it).
    pub fn vips_by_id(&self) -> Vec<(u32, VipById)> {
        let Some(map) = self.vips_by_id.as_ref() else {
            return Vec::new();
        };
        (0..map.len())
            .filter_map(|id| map.get(&id, 0).ok().map(|e| (id, e)))
            .filter(|(_, e)| *e != VipById::default())
            .collect()
    }

    pub fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        self.backends
            .set(id, backend, 0)
            .with_context(|| format!("writing BACKENDS[{id}]"))
    }

    pub fn backend(&self, id: u32) -> Result<Backend> {
        Ok(self.backends.get(&id, 0)?)
    }

    /// Capacity of `MAGLEV_SLOTS`.
    pub fn slot_capacity(&self) -> u32 {
        self.slots.capacity() as u32
    }

    /// Writes `table` at `offset` of `MAGLEV_SLOTS`.
    pub fn write_slots(&mut self, offset: u32, table: &[u32]) -> Result<()> {
        let start = self.region(offset, table.len())?;
        self.slots.write(start, table);
        Ok(())
    }

    /// `write_slots` for a table of positions and ids.
    pub fn write_table(&mut self, offset: u32, table: &SlotTable) -> Result<()> {
        let start = self.region(offset, table.len())?;
        self.slots.write_table(start, table);
        Ok(())
    }

    /// The first slot of a table of `len` slots at `offset`, if it fits.
    fn region(&self, offset: u32, len: usize) -> Result<usize> {
        let start = offset as usize;
        ensure!(
            start + len <= self.slots.capacity(),
            "table of {len} slots at {offset} exceeds MAGLEV_SLOTS"
        );
        Ok(start)
    }

    pub fn read_slots(&self, offset: u32, len: u32) -> Vec<u32> {
        self.slots.read(offset as usize, len as usize)
    }

    /// A VIP's table as written, its backends expected to be `ids`.
    pub fn read_table(&self, offset: u32, len: u32, ids: Vec<u32>) -> SlotTable {
        SlotTable::from_ids_in(self.slots.ids(offset as usize, len as usize), ids)
    }

    pub fn conntrack_get(&self, key: &FlowKey) -> Option<ConnEntry> {
        self.conntrack.get(key, 0).ok()
    }

    pub fn conntrack_insert(&mut self, key: FlowKey, entry: ConnEntry) -> Result<()> {
        self.conntrack
            .insert(key, entry, 0)
            .context("writing CONNTRACK")
    }

    pub fn conntrack_entries(&self) -> Vec<(FlowKey, ConnEntry)> {
        self.conntrack.iter().filter_map(|r| r.ok()).collect()
    }

    fn sum(map: &PerCpuArray<MapData, Counter>, index: u32) -> Counter {
        sum_cpus(map, index)
    }

    /// Packets summed over `reasons`.
    pub fn packets_of(&self, reasons: &[Reason]) -> u64 {
        reasons
            .iter()
            .map(|r| self.reason_counter(*r).packets)
            .sum()
    }

    pub fn reason_counter(&self, reason: Reason) -> Counter {
        Self::sum(&self.reason_stats, reason as u32)
    }

    pub fn reason_counters(&self) -> Vec<(Reason, Counter)> {
        Reason::ALL
            .iter()
            .map(|&r| (r, self.reason_counter(r)))
            .collect()
    }

    pub fn vip_counter(&self, vip_id: u32) -> Counter {
        Self::sum(&self.vip_stats, vip_id)
    }

    pub fn backend_counter(&self, backend_id: u32) -> Counter {
        Self::sum(&self.backend_stats, backend_id)
    }

    /// New flows balanced to the backend (packets = flows).
    pub fn backend_new_flows(&self, backend_id: u32) -> Counter {
        self.backend_new_flows
            .as_ref()
            .map(|m| Self::sum(m, backend_id))
            .unwrap_or_default()
    }

    /// Runs the program once on `packet` (`BPF_PROG_TEST_RUN`, repeat 1) as
    /// if it had arrived on `ingress_ifindex` (0: none, FIB lookups fail).
    pub fn test_run(&mut self, packet: &[u8], ingress_ifindex: u32) -> Result<TestRunOutput> {
        test_run_once(self.program(), packet, ingress_ifindex)
    }

    /// Runs the do-nothing `pass` program once on `packet`: the fixed cost
    /// of a `BPF_PROG_TEST_RUN` call, to subtract from measurements.
    pub fn test_run_empty(&mut self, packet: &[u8]) -> Result<Duration> {
        let program = self.loaded(PROGRAM_PASS)?;
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        };
        Ok(program.test_run(opts)?.duration)
    }

    /// Live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`): the kernel builds
    /// `repeat` real frames from `packet` as if received on `ingress_ifindex`
    /// and really transmits what `program` returns (XDP_TX/REDIRECT), or
    /// hands XDP_PASS frames to the stack. Returns the wall-clock time.
    pub fn run_live(
        &mut self,
        program: &str,
        packet: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<Duration> {
        let program = self.loaded(program)?;
        let ctx_bytes = xdp_md(packet.len(), ingress_ifindex);
        let opts = TestRunOptions {
            data_in: Some(packet),
            ctx_in: Some(&ctx_bytes),
            repeat,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..TestRunOptions::new()
        };
        let started = std::time::Instant::now();
        program
            .test_run(opts)
            .context("BPF_PROG_TEST_RUN (live frames)")?;
        Ok(started.elapsed())
    }

    /// Live frames through `program` with every frame rewritten to `frame`
    /// first (by `bench_gen`, which tail-calls `program`): the kernel does
    /// not restore recycled live frames, and the balancer rewrites them.
    /// `frame` is padded to `BENCH_FRAME_LEN` bytes.
    pub fn run_live_generated(
        &mut self,
        program: &str,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<Duration> {
        anyhow::ensure!(
            frame.len() <= BENCH_FRAME_LEN,
            "frame longer than {BENCH_FRAME_LEN}"
        );
        let mut template = [0u8; BENCH_FRAME_LEN];
        template[..frame.len()].copy_from_slice(frame);
        let target = self.loaded(program)?.fd()?.try_clone()?;
        self.loaded(PROGRAM_BENCH_GEN)?;
        let mut frames: Array<&mut MapData, [u8; BENCH_FRAME_LEN]> = Array::try_from(
            self.ebpf
                .map_mut(MAP_BENCH_FRAME)
                .context("no BENCH_FRAME map")?,
        )?;
        frames.set(0, template, 0)?;
        let mut next = ProgramArray::try_from(
            self.ebpf
                .map_mut(MAP_BENCH_NEXT)
                .context("no BENCH_NEXT map")?,
        )?;
        next.set(0, &target, 0)?;
        self.run_live(PROGRAM_BENCH_GEN, &template, ingress_ifindex, repeat)
    }

    /// Attaches the do-nothing `pass` program to `interface` (testbeds: the
    /// peer of a veth that receives XDP_TX frames needs an XDP program in
    /// native mode).
    pub fn attach_pass(&mut self, interface: &str, mode: XdpMode) -> Result<()> {
        self.attach_helper(PROGRAM_PASS, interface, mode)
    }

    /// Attaches one of the object's helper programs (`pass`, `sink`).
    pub fn attach_helper(&mut self, name: &str, interface: &str, mode: XdpMode) -> Result<()> {
        let program = self.loaded(name)?;
        program
            .attach(interface, mode)
            .with_context(|| format!("attaching {name} to {interface}"))?;
        Ok(())
    }

    /// The balancer as the kernel holds it: (translated instructions, JIT
    /// bytes, instructions the verifier processed).
    pub fn program_size(&mut self) -> Result<(u32, u32, u32)> {
        let info = self.program().info()?;
        Ok((
            info.size_translated().unwrap_or(0) / 8,
            info.size_jitted(),
            info.verified_instruction_count().unwrap_or(0),
        ))
    }

    /// Kernel memory charged to the connection table (from the map's fdinfo).
    pub fn conntrack_memlock(&self) -> Option<u64> {
        let fd = self.conntrack_fd.as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Times `packet` over `repeat` runs in one call (kernel average per run).
    /// Only meaningful for packets the program does not rewrite.
    pub fn test_run_repeat(&mut self, packet: &[u8], repeat: u32) -> Result<Duration> {
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::new()
        };
        Ok(self
            .program()
            .test_run(opts)
            .context("BPF_PROG_TEST_RUN")?
            .duration)
    }
}

/// Entry `index` of a per-CPU counter array, summed over the CPUs
/// (0 when the entry cannot be read).
pub fn sum_cpus(map: &PerCpuArray<MapData, Counter>, index: u32) -> Counter {
    map.get(&index, 0)
        .map(|per_cpu| {
            per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            })
        })
        .unwrap_or_default()
}

/// A `struct xdp_md` for `BPF_PROG_TEST_RUN`: data, data_end, data_meta,
/// ingress_ifindex, rx_queue_index, egress_ifindex.
/// Runs `program` once on `packet` (`BPF_PROG_TEST_RUN`, repeat 1) as if
/// it had arrived on `ingress_ifindex` (0: none).
pub(crate) fn test_run_once(
    program: &mut Xdp,
    packet: &[u8],
    ingress_ifindex: u32,
) -> Result<TestRunOutput> {
    let mut out = vec![0u8; packet.len() + 256];
    let ctx_bytes = xdp_md(packet.len(), ingress_ifindex);
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in: (ingress_ifindex != 0).then_some(ctx_bytes.as_slice()),
        ..TestRunOptions::new()
    };
    let result = program.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    Ok(TestRunOutput {
        action: result.return_value,
        packet: out,
        duration: result.duration,
    })
}

fn xdp_md(len: usize, ingress_ifindex: u32) -> Vec<u8> {
    [0, len as u32, 0, ingress_ifindex, 0, 0]
        .iter()
        .flat_map(|w: &u32| w.to_ne_bytes())
        .collect()
}

/// Fails with one clear line when `dir` is not on a mounted bpffs.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let on_bpffs = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, at, kind) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        kind == "bpf" && dir.starts_with(at)
    });
    if !on_bpffs {
        if let Some(netns) = under_ip_netns_exec() {
            bail!(
                "{} is not on a mounted bpffs here: `ip netns exec` gives its command a /sys of \
                 its own, without the host's bpffs. Run `nsenter --net=/var/run/netns/{netns} lbd ...` \
                 instead (network namespace only, the host's mounts kept), so pinned state outlives \
                 the command",
                dir.display()
            );
        }
        bail!(
            "{} is not on a mounted bpffs: run `mount -t bpf bpf /sys/fs/bpf` (or `cargo xtask setup`)",
            dir.display()
        );
    }
    Ok(())
}

/// The named network namespace (one under /var/run/netns) this process
/// runs in, if any: without bpffs there, it was most likely started by
/// `ip netns exec`, which mounts a /sys of its own.
fn under_ip_netns_exec() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let inode = |p: &str| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let net = inode("/proc/self/ns/net")?;
    std::fs::read_dir("/var/run/netns")
        .ok()?
        .flatten()
        .find(|e| inode(&e.path().to_string_lossy()) == Some(net))
        .map(|e| e.file_name().to_string_lossy().into_owned())
}
