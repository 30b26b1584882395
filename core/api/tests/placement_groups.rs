//! Placement groups end to end on a real multi-process cluster: a head with no CPUs and
//! three two-CPU nodes, worker processes being this test binary re-executed.

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use harness::Cluster;
use ionet::resources::Quantity;
use ionet::{PlacementStrategy, TaskOptions};

#[ionet::remote]
fn where_am_i(bundle: u32) -> (u32, String) {
    (bundle, ionet::get_runtime_context().unwrap().node_id.hex())
}

/// Says where it lives.
pub struct Locator;

#[ionet::actor]
impl Locator {
    pub fn new() -> Self {
        Locator
    }

    pub fn node(&self) -> String {
        ionet::get_runtime_context().unwrap().node_id.hex()
    }
}

fn started_marker() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("ionet-pg-test-{}", std::env::var("IONET_PG_TEST_DRIVER").unwrap_or_default()))
}

/// Marks that it started, then sleeps (to be ended by the group's removal).
#[ionet::remote]
fn sleep_in_bundle(millis: u64) -> u64 {
    std::fs::write(started_marker(), "").unwrap();
    std::thread::sleep(Duration::from_millis(millis));
    millis
}

fn cpu_bundles(count: usize) -> Vec<BTreeMap<String, f64>> {
    (0..count).map(|_| BTreeMap::from([("CPU".to_string(), 1.0)])).collect()
}

fn strict_spread_group_runs_each_task_on_its_bundles_node() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    for _ in 0..3 {
        cluster.add_node(&["--num-cpus", "2"]);
    }
    cluster.init();
    harness::wait_until("three nodes with CPUs to register", Duration::from_secs(30), || {
        ionet::nodes().unwrap().iter().filter(|node| node.is_alive() && !node.is_head).count() == 3
    });

    let group = ionet::placement_group(cpu_bundles(3), PlacementStrategy::StrictSpread).unwrap();
    assert!(group.wait(Duration::from_secs(30)).unwrap(), "a strict-spread group of 3 fits 3 nodes");
    let nodes: Vec<String> = group.bundle_nodes().unwrap().iter().map(|node| node.hex()).collect();
    assert_eq!(nodes.len(), 3);
    assert_eq!(nodes.iter().collect::<BTreeSet<_>>().len(), 3, "bundles on three different nodes: {nodes:?}");
    for (index, node) in nodes.iter().enumerate() {
        let options = TaskOptions::default().placement_group(&group, index as u32);
        let task = where_am_i::options(options).remote(index as u32);
        let (_, ran_on) = ionet::get_timeout(&task, Duration::from_secs(60)).unwrap();
        assert_eq!(&ran_on, node, "the task of bundle {index} runs on the bundle's node");
    }
    // An actor in a bundle lives on the bundle's node, not on the node that created it
    // (the driver's, the head, has no bundle at all).
    for (index, node) in nodes.iter().enumerate() {
        let options = ionet::ActorOptions::new().placement_group(&group, index as u32);
        let locator = Locator::options(options).remote().unwrap();
        let lives_on = ionet::get_timeout(&locator.node(), Duration::from_secs(60)).unwrap();
        assert_eq!(&lives_on, node, "the actor of bundle {index} lives on the bundle's node");
        ionet::kill(&locator, true).unwrap();
    }

    // Four bundles on three nodes never fit strictly spread: it stays pending, then goes.
    let too_big = ionet::placement_group(cpu_bundles(4), PlacementStrategy::StrictSpread).unwrap();
    assert!(!too_big.wait(Duration::from_millis(1_500)).unwrap(), "4 strict-spread bundles cannot fit 3 nodes");
    assert!(too_big.bundle_nodes().unwrap().is_empty());
    ionet::remove_placement_group(&too_big).unwrap();
    assert!(too_big.wait(Duration::from_millis(100)).is_err(), "a removed group is not waited for");

    // Removing the placed group ends the task running inside it and gives its CPUs
    // back: each node again has 2 free.
    let inside =
        sleep_in_bundle::options(TaskOptions::default().placement_group(&group, 0).max_retries(0)).remote(120_000u64);
    let marker_deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ionet::wait(std::slice::from_ref(&inside), 1, Some(Duration::from_millis(200))).unwrap().0.is_empty()
        && !started_marker().exists()
    {
        assert!(std::time::Instant::now() < marker_deadline, "the task in the bundle never started");
    }
    ionet::remove_placement_group(&group).unwrap();
    let ended = ionet::get_timeout(&inside, Duration::from_secs(60));
    assert!(
        matches!(ended, Err(ionet::IonetError::WorkerCrashed { .. })),
        "a task in a removed group ends with its worker, got {ended:?}"
    );
    harness::wait_until("every node to have its 2 CPUs free again", Duration::from_secs(30), || {
        ionet::nodes()
            .unwrap()
            .iter()
            .filter(|node| node.is_alive() && !node.is_head)
            .all(|node| node.available.get("CPU") == Quantity::whole(2))
    });
    drop(cluster);
}

/// Three GPU providers at $2.10, $0.35 and $1.20 per GPU-hour: a group asked cheapest
/// first lands on the cheapest nodes that keep its strategy (a strict pack on the cheapest
/// node with room, a spread over the two cheapest), and says so in the listing; its tasks
/// run there.
fn cheapest_first_groups_take_the_cheapest_gpus_that_keep_the_strategy() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    for (price, model) in [("2.10", "H100"), ("0.35", "RTX4090"), ("1.20", "A100-80GB")] {
        cluster.add_node(&["--num-cpus", "4", "--num-gpus", "2", "--gpu-type", model, "--price-per-gpu-hour", price]);
    }
    // Priced GPUs need credit: without it the head removes the groups (the funding watcher
    // raced the test's asserts).
    cluster.ionet(&["credits", "add", "--account", "default", "--amount", "10"]);
    cluster.init();
    harness::wait_until("three GPU nodes to register", Duration::from_secs(30), || {
        ionet::nodes().unwrap().iter().filter(|node| node.is_alive() && node.gpus.len() == 2).count() == 3
    });
    let model_of: BTreeMap<String, String> =
        ionet::nodes().unwrap().into_iter().map(|node| (node.node_id.hex(), node.accelerator_type)).collect();
    let gpu_bundles = |count: usize| -> Vec<BTreeMap<String, f64>> {
        (0..count).map(|_| BTreeMap::from([("CPU".to_string(), 1.0), ("GPU".to_string(), 1.0)])).collect()
    };
    let cheapest = ionet::PlacementGroupOptions { cheapest_first: true, ..Default::default() };
    let models = |group: &ionet::PlacementGroup| -> Vec<String> {
        assert!(group.wait(Duration::from_secs(30)).unwrap(), "the group is placed");
        group.bundle_nodes().unwrap().iter().map(|node| model_of[&node.hex()].clone()).collect()
    };

    let packed = ionet::placement_group_with(gpu_bundles(2), PlacementStrategy::StrictPack, cheapest.clone()).unwrap();
    assert_eq!(models(&packed), ["RTX4090", "RTX4090"], "both GPUs of the cheapest node");
    let (_, ran_on) = ionet::get_timeout(
        &where_am_i::options(TaskOptions::default().num_gpus(1.0).placement_group(&packed, 1)).remote(1),
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(model_of[&ran_on], "RTX4090", "its task runs on the bundle's node");
    // The cheapest node is full: the next cheapest that holds a whole pack.
    let next = ionet::placement_group_with(gpu_bundles(2), PlacementStrategy::StrictPack, cheapest.clone()).unwrap();
    assert_eq!(models(&next), ["A100-80GB", "A100-80GB"]);
    ionet::remove_placement_group(&packed).unwrap();
    ionet::remove_placement_group(&next).unwrap();
    // The head places by what the nodes last said they have free: wait until they say so.
    harness::wait_until("the removed groups' GPUs to be free again", Duration::from_secs(30), || {
        ionet::nodes()
            .unwrap()
            .iter()
            .filter(|node| node.gpus.len() == 2)
            .all(|node| node.available.get("GPU") == Quantity::whole(2))
    });
    let spread = ionet::placement_group_with(gpu_bundles(2), PlacementStrategy::StrictSpread, cheapest).unwrap();
    let mut spread_models = models(&spread);
    spread_models.sort();
    assert_eq!(spread_models, ["A100-80GB", "RTX4090"], "a strict spread over the two cheapest nodes");
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&cluster.ionet(&["list", "placement-groups", "--json"])).unwrap();
    let row = listed.iter().find(|row| row["placement_group_id"] == spread.id().hex()).expect("listed");
    assert_eq!(row["cheapest_first"], true, "{row}");
    drop(cluster);
}

fn main() {
    // Workers inherit the driver's environment through their node daemon's: the marker
    // path is shared by the driver and its workers.
    if std::env::var_os("IONET_PG_TEST_DRIVER").is_none() {
        std::env::set_var("IONET_PG_TEST_DRIVER", std::process::id().to_string());
    }
    harness::run(
        &[
            (
                "strict_spread_group_runs_each_task_on_its_bundles_node",
                strict_spread_group_runs_each_task_on_its_bundles_node,
            ),
            (
                "cheapest_first_groups_take_the_cheapest_gpus_that_keep_the_strategy",
                cheapest_first_groups_take_the_cheapest_gpus_that_keep_the_strategy,
            ),
        ],
        Duration::from_secs(180),
    );
}
