//! The backend side: the `decap` XDP program on a backend's interface.

use std::path::Path;

use anyhow::{Context, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use lb_common::{
    maps::{
        Counter, DecapReason, GLOBAL_SETTINGS, MAP_CONNTRACK, MAP_DECAP_STATS, MAP_MAGLEV_SLOTS,
        PROGRAM_DECAP,
    },
    settings::Settings,
};

use crate::{
    dataplane::{TestRunOutput, test_run_once},
    object::ebpf_object,
};

pub struct Decap {
    stats: PerCpuArray<MapData, Counter>,
    ebpf: Ebpf,
    /// Held while this process owns the pin directory.
    _lock: Option<std::fs::File>,
}

impl Decap {
    /// Loads `decap` and attaches it to `interface` with its link pinned in
    /// `pin_dir` (and its counters too), so decapsulation goes on when this
    /// process dies: a backend whose `lbd backend` was killed keeps
    /// receiving. A pinned link found there is taken over atomically.
    /// Locked: one `lbd backend` per pin directory.
    pub fn attach_pinned(
        interface: &str,
        chosen: &crate::xdp_mode::Chosen,
        gue_port: u16,
        pin_dir: &Path,
    ) -> Result<(Decap, crate::dataplane::Attached)> {
        let lock = crate::instance_lock::lock_pin_dir(pin_dir)?;
        let mut decap = Self::load_with(gue_port, Some(pin_dir))?;
        decap._lock = Some(lock);
        let program: &mut Xdp = decap
            .ebpf
            .program_mut(PROGRAM_DECAP)
            .context("no decap program")?
            .try_into()?;
        let mut ids = Vec::new();
        let how = crate::dataplane::attach_pinned_program(
            program, pin_dir, "decap", interface, chosen, &mut ids,
        )?;
        Ok((decap, how))
    }

    /// Loads `decap` and attaches it to `interface` (calling thread's namespace).
    pub fn attach(interface: &str, mode: XdpMode, gue_port: u16) -> Result<Decap> {
        let mut decap = Self::load(gue_port)?;
        decap
            .program()?
            .attach(interface, mode)
            .with_context(|| format!("attaching decap to {interface}"))?;
        Ok(decap)
    }

    /// Loads `decap` without attaching it (tests run it with `test_run`).
    pub fn load(gue_port: u16) -> Result<Decap> {
        Self::load_with(gue_port, None)
    }

    fn load_with(gue_port: u16, pin_dir: Option<&Path>) -> Result<Decap> {
        let settings = Settings {
            gue_port: gue_port.to_be(),
            ..Settings::DEFAULT
        };
        // The balancer's big maps are in the same object; keep them tiny here.
        let mut loader = EbpfLoader::new();
        loader
            .override_global(GLOBAL_SETTINGS, &settings, true)
            .map_max_entries(MAP_MAGLEV_SLOTS, 1)
            .map_max_entries(MAP_CONNTRACK, 1);
        let stats_pin = pin_dir.map(|d| d.join(MAP_DECAP_STATS));
        if let Some(path) = &stats_pin {
            loader.map_pin_path(MAP_DECAP_STATS, path.as_path());
        }
        let mut ebpf = loader
            .load(ebpf_object()?)
            .context("loading the XDP object")?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_DECAP)
            .context("no decap program")?
            .try_into()?;
        program
            .load()
            .context("the kernel verifier rejected decap")?;
        let stats =
            PerCpuArray::try_from(ebpf.take_map(MAP_DECAP_STATS).context("no DECAP_STATS")?)?;
        Ok(Decap {
            stats,
            ebpf,
            _lock: None,
        })
    }

    fn program(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(PROGRAM_DECAP)
            .context("no decap program")?
            .try_into()?)
    }

    /// Runs `decap` once on `packet` (`BPF_PROG_TEST_RUN`).
    pub fn test_run(&mut self, packet: &[u8]) -> Result<TestRunOutput> {
        test_run_once(self.program()?, packet, 0)
    }

    /// Runs `decap` once on `packet` as if it arrived on interface
    /// `ifindex` of the calling thread's namespace (its sockets and FIB).
    pub fn test_run_on(&mut self, packet: &[u8], ifindex: u32) -> Result<TestRunOutput> {
        test_run_once(self.program()?, packet, ifindex)
    }

    pub fn counter(&self, reason: DecapReason) -> Counter {
        crate::dataplane::sum_cpus(&self.stats, reason as u32)
    }
}
