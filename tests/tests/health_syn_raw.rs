//! Half-open health probes with their answers read from raw sockets, as
//! on a host where the receive ring cannot be had (no `AF_PACKET`): the
//! same scenario as `health_syn` (a process of its own, so the probing
//! thread starts in this mode).

use lb_tests::have_root;

#[test]
fn syn_probes_read_from_raw_sockets_tell_up_refused_and_silent_apart() {
    if !have_root() {
        return;
    }
    lb_userspace::syn_probe::read_answers_from_raw_sockets();
    lb_tests::syn_scenario::syn_probes_tell_up_refused_and_silent_apart("synraw");
    assert_eq!(lb_userspace::syn_probe::answers_from_ring(), Some(false));
}
