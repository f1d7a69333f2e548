//! The half-open probe scenario both `health_syn` tests run (each in a
//! process of its own: the probing thread and its sockets belong to the
//! namespace that first probes): a listener is up, a closed port down
//! (reset), a backend that never answers a timeout; and 200 probes in
//! flight at once each get their own answer.

use std::time::Duration;

use lb_userspace::{
    health::{Failure, Probe},
    syn_probe::probe_syn,
};

use crate::netns::NetNs;

/// Runs the scenario in a namespace of its own and checks every answer.
pub fn syn_probes_tell_up_refused_and_silent_apart(name: &str) {
    let ns = NetNs::new(name);
    ns.ip(&["addr", "add", "10.9.0.1/32", "dev", "lo"]);
    ns.ip(&["addr", "add", "10.9.0.2/32", "dev", "lo"]);
    ns.ip(&["-6", "addr", "add", "fd09::1/128", "dev", "lo", "nodad"]);
    // 10.9.0.2 never answers: SYNs to it are dropped on arrival. (Dropped
    // on the way out instead, the send itself fails: a local error, which
    // never counts against a backend.)
    ns.sh("nft add table inet fault && \
         nft add chain inet fault in '{ type filter hook input priority 0 ; }' && \
         nft add rule inet fault in ip daddr 10.9.0.2 tcp dport 80 drop");
    let guard = ns.enter();
    let results = std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l4 = tokio::net::TcpListener::bind("10.9.0.1:80").await.unwrap();
            let l6 = tokio::net::TcpListener::bind("[fd09::1]:80").await.unwrap();
            let t = Duration::from_millis(300);
            let ip = |s: &str| s.parse().unwrap();
            let up4 = probe_syn(ip("10.9.0.1"), 80, t).await;
            let up6 = probe_syn(ip("fd09::1"), 80, t).await;
            let refused = probe_syn(ip("10.9.0.1"), 81, t).await;
            let silent = probe_syn(ip("10.9.0.2"), 80, t).await;
            // 200 at once, to the open port and the closed one alternately.
            let many = futures_join(
                (0..200)
                    .map(|i| probe_syn(ip("10.9.0.1"), 80 + (i % 2) as u16, t))
                    .collect(),
            )
            .await;
            drop((l4, l6));
            (up4, up6, refused, silent, many)
        })
    })
    .join()
    .unwrap();
    drop(guard);
    let (up4, up6, refused, silent, many) = results;
    assert_eq!(up4, Probe::Up);
    assert_eq!(up6, Probe::Up);
    assert_eq!(refused, Probe::Down(Failure::Connect));
    assert_eq!(silent, Probe::Down(Failure::Timeout));
    for (i, p) in many.iter().enumerate() {
        let want = if i % 2 == 0 {
            Probe::Up
        } else {
            Probe::Down(Failure::Connect)
        };
        assert_eq!(*p, want, "probe {i}");
    }
}

/// Runs every future to completion, all in flight at once.
async fn futures_join<F: Future + 'static>(futures: Vec<F>) -> Vec<F::Output> {
    tokio::task::LocalSet::new()
        .run_until(async move {
            let handles: Vec<_> = futures
                .into_iter()
                .map(|f| tokio::task::spawn_local(f))
                .collect();
            let mut out = Vec::new();
            for h in handles {
                out.push(h.await.unwrap());
            }
            out
        })
        .await
}
