//! The cluster simulator in a small configuration: 100 real node daemons join one real
//! head at once, all register, and over a steady window none is declared dead, nobody
//! registers again, every node's view of the cluster holds every node (one that joined
//! later too), and the head answers heartbeats and node-table reads.

use std::time::Duration;

use ionet_benches::sim::{simulate, SimOptions};

#[test]
fn a_hundred_simulated_nodes_join_one_head_and_none_is_declared_dead() {
    let options = SimOptions {
        binary: env!("CARGO_BIN_EXE_ionet-sim").into(),
        nodes: 100,
        view_nodes: 100,
        // Longer than the heartbeat timeout (10 s): a node the head lost would be dead.
        window: Duration::from_secs(12),
        register_timeout: Duration::from_secs(120),
    };
    let report = simulate(&options).expect("the simulation runs");
    eprintln!("{report}");
    assert_eq!(report.nodes, 100);
    assert_eq!(report.false_deaths, 0, "{report}");
    assert_eq!(report.reregistrations, 0, "{report}");
    assert_eq!(report.heartbeats_failed, 0, "{report}");
    // Every node's view holds the whole fleet and the probe that joined after it (its
    // heartbeat replies carried the change).
    assert_eq!((report.view_least, report.view_most), (101, 101), "{report}");
    assert!(report.heartbeat_p50 > Duration::ZERO && report.view_p50 > Duration::ZERO, "{report}");
    assert!(report.head_rss_mib > 0.0 && report.head_cpu_share > 0.0, "{report}");
}
