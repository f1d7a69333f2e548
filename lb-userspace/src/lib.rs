//! The control plane of the load balancer: loading the XDP program and
//! writing its maps. Binaries: `lbd` (daemon) and `lbctl` (CLI).

pub mod dataplane;
pub mod object;
pub mod slots;
pub mod vip_table;
