//! The control plane of the load balancer: loading the XDP program and
//! writing its maps. Binaries: `lbd` (daemon) and `lbctl` (CLI).

pub mod announce;
pub mod answer_ring;
pub mod api;
pub mod backend_check;
pub mod capture;
pub mod cli_help;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod fleet;
pub mod fleet_sim;
pub mod flow_count;
pub mod flow_query;
pub mod health;
pub mod instance_lock;
pub mod link_watch;
pub mod metrics;
pub mod object;
pub mod reconcile;
pub mod render;
pub mod serve;
pub mod sizing;
pub mod slot_table;
pub mod slots;
pub mod slots_mmap;
pub mod syn_probe;
pub mod tunnel_probe;
pub mod vip_table;
pub mod xdp_mode;
