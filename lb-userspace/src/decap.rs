//! The backend side: the `decap` XDP program on a backend's interface.

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
}

impl Decap {
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
        let settings = Settings {
            gue_port: gue_port.to_be(),
            ..Settings::DEFAULT
        };
        // The balancer's big maps are in the same object; keep them tiny here.
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_SETTINGS, &settings, true)
            .map_max_entries(MAP_MAGLEV_SLOTS, 1)
            .map_max_entries(MAP_CONNTRACK, 1)
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
        Ok(Decap { stats, ebpf })
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

    pub fn counter(&self, reason: DecapReason) -> Counter {
        crate::dataplane::sum_cpus(&self.stats, reason as u32)
    }
}
