//! Half-open health probes (`kind = "syn"`) against real sockets, their
//! answers read from the receive ring (`answer_ring`), as lbd does by
//! default: see `lb_tests::syn_scenario`.

use lb_tests::have_root;

#[test]
fn syn_probes_tell_up_refused_and_silent_apart() {
    if !have_root() {
        return;
    }
    lb_tests::syn_scenario::syn_probes_tell_up_refused_and_silent_apart("synprobe");
    assert_eq!(lb_userspace::syn_probe::answers_from_ring(), Some(true));
}
