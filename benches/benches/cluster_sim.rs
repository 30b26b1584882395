//! How a head's cost grows with its cluster: real node daemons (fleets of `ionet-sim`
//! processes) join one real head, then a steady window is measured (see
//! `ionet_benches::sim`).
//!
//!   cargo bench -p ionet-benches --bench cluster_sim -- [--nodes 100,1000,10000] [--seconds 20] [--view-nodes 100]
//!
//! A view of the cluster is the cluster's size (about 1.5 KiB a node in a node's
//! scheduler), so `--view-nodes` of them live in this one machine: 1,000 views of 10,000
//! nodes took 16 of its 24 GiB and left the fleet starved for memory; 100 by default.

use std::time::Duration;

use ionet_benches::sim::{simulate, SimOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|arg| arg == "--list") {
        return; // cargo bench --list
    }
    let value = |name: &str| args.iter().position(|arg| arg == name).and_then(|index| args.get(index + 1)).cloned();
    let counts: Vec<usize> = value("--nodes")
        .unwrap_or_else(|| "100,1000".into())
        .split(',')
        .map(|count| count.trim().parse().expect("--nodes takes counts separated by commas"))
        .collect();
    let seconds: u64 = value("--seconds").and_then(|text| text.parse().ok()).unwrap_or(20);
    // Nodes keeping a view of the cluster (all of them up to this many).
    let view_nodes: usize = value("--view-nodes").and_then(|text| text.parse().ok()).unwrap_or(100);
    for nodes in counts {
        let options = SimOptions {
            binary: env!("CARGO_BIN_EXE_ionet-sim").into(),
            nodes,
            view_nodes,
            window: Duration::from_secs(seconds),
            register_timeout: Duration::from_secs(600),
        };
        match simulate(&options) {
            Ok(report) => println!("{report}"),
            Err(why) => println!("cluster sim: {nodes} nodes: failed: {why}"),
        }
    }
}
