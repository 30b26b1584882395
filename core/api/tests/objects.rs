//! The distributed object store end to end: large values in shared memory, spilling,
//! transfers between nodes, freeing every copy, and Arrow without copies.

mod harness;

use std::sync::Arc;
use std::time::Duration;

use harness::{holds_for, node_named, wait_until, Cluster};
use ionet::arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch};
use ionet::{InitConfig, ObjectRef, SchedulingStrategy, TaskOptions};

const MIB: usize = 1024 * 1024;

fn checksum(bytes: &[u8]) -> u64 {
    // FNV-1a over 8-byte words with the position mixed in: tells a corrupted or
    // reordered transfer from an intact one.
    let mut hash = 0xcbf29ce484222325u64;
    let mut words = bytes.chunks_exact(8);
    for (index, word) in (&mut words).enumerate() {
        let word = u64::from_le_bytes(word.try_into().unwrap());
        hash = (hash ^ word ^ index as u64).wrapping_mul(0x100000001b3);
    }
    words.remainder().iter().fold(hash, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x100000001b3))
}

fn pattern(size: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; size];
    for (index, word) in bytes.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&(index as u64).wrapping_mul(0x9e3779b97f4a7c15).wrapping_add(seed).to_le_bytes());
    }
    bytes
}

#[ionet::remote]
fn make_blob(size: u64, seed: u64) -> (Vec<u8>, u64) {
    let blob = pattern(size as usize, seed);
    let sum = checksum(&blob);
    (blob, sum)
}

#[ionet::remote]
fn blob_checksum(blob: (Vec<u8>, u64)) -> (u64, u64, String) {
    (checksum(&blob.0), blob.1, ionet::get_runtime_context().unwrap().node_id.hex())
}

/// The next link of a chain: the previous blob with `step` added to every byte.
#[ionet::remote]
fn grow(previous: (Vec<u8>, u64), step: u64) -> (Vec<u8>, u64) {
    let mut blob = previous.0;
    for byte in blob.iter_mut() {
        *byte = byte.wrapping_add(step as u8);
    }
    let sum = checksum(&blob);
    (blob, sum)
}

/// A value put by the task's worker, which owns it, returned inside a list.
#[ionet::remote]
fn put_inside(size: u64) -> Vec<ObjectRef<Vec<u8>>> {
    vec![ionet::put(&pattern(size as usize, 5)).unwrap()]
}

/// A value put by the task's worker holding a ref to another it put, returned inside a
/// list: the inner one is held by the outer one's value only.
#[ionet::remote]
fn put_nested(size: u64) -> Vec<ObjectRef<Vec<ObjectRef<Vec<u8>>>>> {
    let inner = ionet::put(&pattern(size as usize, 7)).unwrap();
    vec![ionet::put(&vec![inner]).unwrap()]
}

/// The refs inside a list passed by ref (the task reads them out of the list's value,
/// holding no lend of its own), returned.
#[ionet::remote]
fn unwrap_list(list: Vec<ObjectRef<Vec<u8>>>) -> Vec<ObjectRef<Vec<u8>>> {
    list
}

/// Asks a task on node `at` for a value its worker puts (`put_inside`) and returns the
/// list it got: the ref passes from its owner through this task's worker to the caller.
#[ionet::remote]
fn pass_on(size: u64, at: ionet::NodeId) -> Vec<ObjectRef<Vec<u8>>> {
    let pinned =
        TaskOptions::default().scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id: at, soft: false });
    ionet::get(&put_inside::options(pinned).remote(size)).unwrap()
}

/// Checks in under `dir` and waits for `expected` tasks to have (so each runs on a worker
/// of its own), then returns a value its worker puts, inside a list, with the worker's pid.
#[ionet::remote]
fn put_together(dir: String, expected: usize, seed: u64) -> (Vec<ObjectRef<Vec<u8>>>, u32) {
    harness::meet(&dir, expected);
    (vec![ionet::put(&pattern(4096, seed)).unwrap()], std::process::id())
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

/// Keeps refs it is given (inside its arguments) until told to forget them.
pub struct Keeper {
    kept: Vec<ObjectRef<Vec<u8>>>,
}

#[ionet::actor]
impl Keeper {
    pub fn new() -> Self {
        Keeper { kept: Vec::new() }
    }

    pub fn keep(&mut self, refs: Vec<ObjectRef<Vec<u8>>>) -> usize {
        self.kept.extend(refs);
        self.kept.len()
    }

    /// The checksum of every kept value, read now.
    pub fn read(&self) -> Vec<u64> {
        self.kept.iter().map(|kept| checksum(&ionet::get(kept).unwrap())).collect()
    }

    pub fn forget(&mut self) -> usize {
        std::mem::take(&mut self.kept).len()
    }

    /// A value this actor puts, returned inside a list (the actor keeps no handle).
    pub fn put_inside(&self, size: u64) -> Vec<ObjectRef<Vec<u8>>> {
        vec![ionet::put(&pattern(size as usize, 9)).unwrap()]
    }
}

/// Puts a value the worker keeps owning (held in a static); returns the worker's pid.
#[ionet::remote]
fn put_and_keep(size: u64) -> u32 {
    static KEPT: std::sync::Mutex<Vec<ObjectRef<Vec<u8>>>> = std::sync::Mutex::new(Vec::new());
    KEPT.lock().unwrap().push(ionet::put(&pattern(size as usize, 3)).unwrap());
    std::process::id()
}

fn store_bytes(node_address: &str) -> u64 {
    let stats = ionet::testing::object_store_stats(node_address).unwrap();
    stats.bytes_in_memory + stats.bytes_spilled
}

fn puts_beyond_capacity_spill_and_read_back() {
    ionet::init(InitConfig { object_store_memory: Some(64 * MIB as u64), ..InitConfig::default().num_cpus(1.0) })
        .unwrap();
    let node = ionet::testing::local_node_address().unwrap();
    let mut refs: Vec<(ObjectRef<Vec<u8>>, u64)> = Vec::new();
    for seed in 0..32u64 {
        let value = pattern(16 * MIB, seed);
        refs.push((ionet::put(&value).unwrap(), checksum(&value)));
    }
    let stats = ionet::testing::object_store_stats(&node).unwrap();
    assert!(stats.bytes_in_memory <= 64 * MIB as u64, "{stats:?}");
    assert!(stats.bytes_spilled >= 400 * MIB as u64, "512 MiB in a 64 MiB store must spill: {stats:?}");
    for (object, sum) in &refs {
        assert_eq!(checksum(&ionet::get(object).unwrap()), *sum);
    }
    drop(refs);
    wait_until("the store to be empty after every ref is dropped", Duration::from_secs(30), || store_bytes(&node) == 0);
    ionet::shutdown();
}

fn arrow_batches_read_back_without_copies() {
    ionet::init(InitConfig::default().num_cpus(1.0)).unwrap();
    let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(0..100_000));
    let scores: ArrayRef = Arc::new(Float64Array::from_iter_values((0..100_000).map(|i| i as f64 / 3.0)));
    let batch = RecordBatch::try_from_iter([("id", ids), ("score", scores)]).unwrap();
    let object = ionet::put_record_batch(&batch).unwrap();
    let read = ionet::get_record_batch(&object).unwrap();
    assert_eq!(read, batch);
    // The column's bytes lie in a shared-memory mapping of the store, not in a copy.
    let pointer = read.column(0).to_data().buffers()[0].as_ptr() as usize;
    let mapped = in_store_mapping(pointer);
    assert!(mapped, "column data at {pointer:#x} is not inside a mapping of the object store");
    drop((read, object));

    // Raw bytes: one copy in, none out, and still a Vec<u8> to `get`.
    let data = pattern(8 * MIB, 3);
    let object = ionet::put_bytes(&data).unwrap();
    let view = ionet::get_bytes(&object).unwrap();
    assert_eq!(&*view, &data[..]);
    assert!(in_store_mapping(view.as_ptr() as usize), "get_bytes copied the object");
    assert_eq!(ionet::get(&object).unwrap(), data);
    let small = ionet::put_bytes(b"tiny").unwrap();
    assert_eq!(&*ionet::get_bytes(&small).unwrap(), b"tiny");
    ionet::shutdown();
}

fn a_large_object_moves_between_nodes_and_every_copy_is_freed() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", "1", "--labels", "name=a"]);
    cluster.add_node(&["--num-cpus", "1", "--labels", "name=b"]);
    cluster.init();
    let nodes = ionet::nodes().unwrap();
    let node =
        |name: &str| nodes.iter().find(|node| node.labels.get("name").map(String::as_str) == Some(name)).unwrap();
    let (a, b) = (node("a"), node("b"));
    let pinned = |node: &ionet::Node| {
        TaskOptions::default()
            .scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id: node.node_id, soft: false })
    };
    let blob = make_blob::options(pinned(a)).remote(200 * MIB as u64, 7u64);
    let verdict = blob_checksum::options(pinned(b)).remote(&blob);
    let (sum_on_b, sum_on_a, ran_on) = ionet::get_timeout(&verdict, Duration::from_secs(120)).unwrap();
    assert_eq!(sum_on_b, sum_on_a, "the 200 MiB object arrived intact");
    assert_eq!(ran_on, b.node_id.hex());
    assert!(store_bytes(&a.address) >= 200 * MIB as u64, "the primary copy is on node a");
    assert!(store_bytes(&b.address) >= 200 * MIB as u64, "node b pulled a copy");
    drop((blob, verdict));
    wait_until("both stores to be empty", Duration::from_secs(30), || {
        store_bytes(&a.address) == 0 && store_bytes(&b.address) == 0
    });
    drop(cluster);
}

/// A chain of 5 tasks whose values live only on a node that is then SIGKILLed: a get of
/// the last rebuilds the chain from its lineage on the survivors, exact; with
/// `max_retries=0` the get fails with `ObjectLost` saying the lineage allows no re-run.
/// The driver drops every handle but the last: the kept lineage holds the rest. An
/// object whose owner died with the node fails with `OwnerDied`.
fn a_lost_chain_is_rebuilt_from_its_lineage() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    let doomed = cluster.add_node(&["--num-cpus", "1", "--labels", "name=a"]);
    cluster.add_node(&["--num-cpus", "1", "--labels", "name=b"]);
    cluster.add_node(&["--num-cpus", "1", "--labels", "name=c"]);
    cluster.init();
    let a = node_named("a");
    // Soft: the first run is on a, a re-run goes wherever there is room.
    let on_a = |retries: u32| {
        TaskOptions::default()
            .scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id: a.node_id, soft: true })
            .max_retries(retries)
    };
    let size = MIB as u64;
    let chain = |retries: u32, seed: u64| {
        let mut last = make_blob::options(on_a(retries)).remote(size, seed);
        for step in 1..5u64 {
            last = grow::options(on_a(retries)).remote(&last, step);
        }
        last
    };
    let rebuildable = chain(3, 11);
    let unrebuildable = chain(0, 12);
    let pinned = TaskOptions::default()
        .scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id: a.node_id, soft: false });
    let owned_on_a = ionet::get_timeout(&put_inside::options(pinned).remote(size), Duration::from_secs(60)).unwrap();
    // Ready, not read: a read would copy the values to the driver's node.
    let ends = [rebuildable.clone(), unrebuildable.clone()];
    let (ready, _) = ionet::wait(&ends, 2, Some(Duration::from_secs(120))).unwrap();
    assert_eq!(ready.len(), 2);
    drop((ends, ready));
    assert!(store_bytes(&a.address) >= 10 * size, "every link lives on node a");

    cluster.kill(doomed);
    let mut expected = pattern(size as usize, 11);
    for byte in expected.iter_mut() {
        *byte = byte.wrapping_add(1 + 2 + 3 + 4);
    }
    let (blob, sum) = ionet::get_timeout(&rebuildable, Duration::from_secs(120)).unwrap();
    assert!(blob == expected, "the rebuilt chain is exact");
    assert_eq!(sum, checksum(&expected));

    let error = ionet::get_timeout(&unrebuildable, Duration::from_secs(60)).unwrap_err();
    assert!(matches!(error, ionet::IonetError::ObjectLost(_)), "{error}");
    let message = error.to_string();
    assert!(message.contains("lineage") && message.contains("max_retries"), "{message}");

    // Its owner died with node a: nobody can say where the value is, or make it again.
    let error = ionet::get_timeout(&owned_on_a[0], Duration::from_secs(60)).unwrap_err();
    assert!(matches!(error, ionet::IonetError::OwnerDied(_)), "{error}");
    drop(cluster);
}

/// A ref put by a task's worker and returned inside a list, held by the driver after
/// every other handle is gone (the list, the worker's own): it still reads back after
/// 10 s, and is freed everywhere once the driver drops it.
fn a_ref_returned_inside_a_list_lives_while_the_driver_holds_it() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", "1", "--labels", "name=a"]);
    cluster.init();
    let a = node_named("a");
    let head = ionet::nodes().unwrap().into_iter().find(|node| node.is_head).unwrap();
    let pinned = TaskOptions::default()
        .scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id: a.node_id, soft: false });
    let size = MIB as u64;
    let inner = {
        let list = put_inside::options(pinned).remote(size);
        ionet::get_timeout(&list, Duration::from_secs(60)).unwrap().pop().unwrap()
    };
    assert!(store_bytes(&a.address) >= size, "the value lives on node a, where its owner put it");
    // Time for any early free to have happened (the worker's own handle went when the
    // task returned; the list is gone).
    std::thread::sleep(Duration::from_secs(10));
    let value = ionet::get_timeout(&inner, Duration::from_secs(60)).unwrap();
    assert!(value == pattern(size as usize, 5), "read back intact");
    drop((value, inner));
    wait_until("every copy to be freed", Duration::from_secs(30), || {
        store_bytes(&a.address) == 0 && store_bytes(&head.address) == 0
    });
    drop(cluster);
}

/// A ref that travels owner → borrower → caller (a task's worker on b returns the list a
/// task on a made) lives while the caller holds it, though the borrower in the middle let
/// go of it; it is freed once the caller drops it.
fn a_ref_passed_on_by_a_borrower_lives_while_the_last_holder_holds_it() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", "1", "--labels", "name=a"]);
    cluster.add_node(&["--num-cpus", "1", "--labels", "name=b"]);
    cluster.init();
    let (a, b) = (node_named("a"), node_named("b"));
    let on_b = TaskOptions::default()
        .scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id: b.node_id, soft: false });
    let size = MIB as u64;
    let inner = {
        let list = pass_on::options(on_b).remote(size, a.node_id);
        ionet::get_timeout(&list, Duration::from_secs(60)).unwrap().pop().unwrap()
    };
    holds_for("the value to stay on node a", Duration::from_secs(3), || store_bytes(&a.address) >= size);
    let value = ionet::get_timeout(&inner, Duration::from_secs(60)).unwrap();
    assert!(value == pattern(size as usize, 5), "read back intact");
    drop((value, inner));
    wait_until("every copy to be freed", Duration::from_secs(30), || {
        [&a.address, &b.address].iter().all(|node| store_bytes(node) == 0)
    });
    drop(cluster);
}

/// A ref read inside a value got from another process's object lives on its own after
/// that value is gone: its owner lent it to the reader when it read it.
fn a_ref_read_inside_a_value_outlives_the_value() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", "1", "--labels", "name=a"]);
    cluster.init();
    let a = node_named("a");
    let size = MIB as u64;
    let inner = {
        let list = ionet::get_timeout(&put_nested::remote(size), Duration::from_secs(60)).unwrap();
        ionet::get_timeout(&list[0], Duration::from_secs(60)).unwrap().pop().unwrap()
    };
    // The list and the outer value are gone (the outer value's object with them).
    holds_for("the inner value to stay on node a", Duration::from_secs(3), || store_bytes(&a.address) >= size);
    assert!(ionet::get_timeout(&inner, Duration::from_secs(60)).unwrap() == pattern(size as usize, 7));
    drop(inner);
    wait_until("the inner value to be freed", Duration::from_secs(30), || store_bytes(&a.address) == 0);
    drop(cluster);
}

/// A ref a task read out of an argument's value and returned lives while the driver holds
/// it, after the argument (the only other holder) is gone.
fn a_ref_read_out_of_an_argument_and_returned_lives_on() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", "1", "--labels", "name=a"]);
    cluster.add_node(&["--num-cpus", "1", "--labels", "name=b"]);
    cluster.init();
    let (a, b) = (node_named("a"), node_named("b"));
    let on = |node: &ionet::Node| {
        TaskOptions::default()
            .scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id: node.node_id, soft: false })
    };
    let size = MIB as u64;
    let outer =
        ionet::get_timeout(&put_nested::options(on(&a)).remote(size), Duration::from_secs(60)).unwrap().remove(0);
    let unwrapped = unwrap_list::options(on(&b)).remote(&outer);
    drop(outer); // the call's argument is now all that holds the list
    let inner = ionet::get_timeout(&unwrapped, Duration::from_secs(60)).unwrap().remove(0);
    drop(unwrapped);
    holds_for("the inner value to stay on node a", Duration::from_secs(3), || store_bytes(&a.address) >= size);
    assert!(ionet::get_timeout(&inner, Duration::from_secs(60)).unwrap() == pattern(size as usize, 7));
    drop(inner);
    wait_until("every copy to be freed", Duration::from_secs(30), || {
        [&a.address, &b.address].iter().all(|node| store_bytes(node) == 0)
    });
    drop(cluster);
}

/// An actor keeps refs passed to it inside a call's arguments: the objects live after the
/// caller dropped every handle, until the actor lets go of them.
fn refs_an_actor_keeps_from_its_arguments_live_until_it_drops_them() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", "1", "--labels", "name=a"]);
    cluster.init();
    let head = ionet::nodes().unwrap().into_iter().find(|node| node.is_head).unwrap();
    let size = MIB as u64;
    let values: Vec<Vec<u8>> = (0..3).map(|seed| pattern(size as usize, seed)).collect();
    let keeper = Keeper::remote().unwrap();
    {
        let refs: Vec<ObjectRef<Vec<u8>>> = values.iter().map(|value| ionet::put(value).unwrap()).collect();
        let kept = keeper.keep(refs.clone());
        assert_eq!(ionet::get_timeout(&kept, Duration::from_secs(60)).unwrap(), 3);
    }
    // The driver's own handles are gone: only the actor holds the values now.
    holds_for("the values to stay in the driver's store", Duration::from_secs(3), || {
        store_bytes(&head.address) >= 3 * size
    });
    let sums = ionet::get_timeout(&keeper.read(), Duration::from_secs(60)).unwrap();
    assert_eq!(sums, values.iter().map(|value| checksum(value)).collect::<Vec<_>>());
    assert_eq!(ionet::get_timeout(&keeper.forget(), Duration::from_secs(60)).unwrap(), 3);
    wait_until("the values to be freed once the actor let go", Duration::from_secs(30), || {
        store_bytes(&head.address) == 0
    });

    // A ref an actor puts and returns inside a list lives while the driver holds it.
    let a = node_named("a");
    let stored = || store_bytes(&a.address) + store_bytes(&head.address);
    let inner = ionet::get_timeout(&keeper.put_inside(size), Duration::from_secs(60)).unwrap().pop().unwrap();
    holds_for("the actor's value to stay", Duration::from_secs(3), || stored() >= size);
    assert!(ionet::get_timeout(&inner, Duration::from_secs(60)).unwrap() == pattern(size as usize, 9));
    drop(inner);
    wait_until("the actor's value to be freed", Duration::from_secs(30), || stored() == 0);
    drop(cluster);
}

/// A node keeps only a few idle workers and stops the rest soon; a worker whose objects
/// the driver holds (lent in a task's return value) is not stopped while it does, and is
/// once the driver lets go.
fn a_worker_holding_lent_objects_is_not_stopped_as_idle() {
    // More workers at once than a node keeps idle (the number of cores, at least 2).
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).max(2);
    let count = cores + 2;
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", &count.to_string()]);
    cluster.init();
    let dir = harness::shared_tempdir();
    let dir_name = dir.path().to_str().unwrap().to_string();
    let lists: Vec<_> = (0..count as u64).map(|seed| put_together::remote(dir_name.clone(), count, seed)).collect();
    let (inner, pids): (Vec<ObjectRef<Vec<u8>>>, Vec<u32>) = lists
        .iter()
        .map(|list| {
            let (mut refs, pid) = ionet::get_timeout(list, Duration::from_secs(60)).unwrap();
            (refs.pop().unwrap(), pid)
        })
        .unzip();
    drop(lists);
    // The node stops idle workers past its limit after a second; not these.
    holds_for("every owner to stay alive", Duration::from_secs(3), || pids.iter().all(|pid| alive(*pid)));
    for (seed, object) in inner.iter().enumerate() {
        let value = ionet::get_timeout(object, Duration::from_secs(60)).unwrap();
        assert!(value == pattern(4096, seed as u64), "value {seed} read back intact");
    }
    drop(inner);
    wait_until("the workers past the idle limit to stop", Duration::from_secs(30), || {
        pids.iter().filter(|pid| alive(**pid)).count() <= cores
    });
    drop(cluster);
}

/// Whether `pointer` lies in this process's mapping of an object-store file.
fn in_store_mapping(pointer: usize) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().filter(|line| line.contains("ionet-objects")).any(|line| {
        let range = line.split_whitespace().next().unwrap();
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (usize::from_str_radix(start, 16).unwrap(), usize::from_str_radix(end, 16).unwrap());
        (start..end).contains(&pointer)
    })
}

/// An object whose owner (the worker that put it) dies leaves its node's store: nobody
/// can read it any more, and a provider's memory is not held by the dead.
fn a_dead_owners_objects_leave_its_node() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", "1", "--labels", "name=a"]);
    cluster.init();
    let a = node_named("a");
    let pinned = TaskOptions::default()
        .scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id: a.node_id, soft: false });
    let owner = ionet::get_timeout(&put_and_keep::options(pinned).remote(MIB as u64), Duration::from_secs(60)).unwrap();
    assert!(store_bytes(&a.address) >= MIB as u64, "the value lives on node a while its owner does");
    // SAFETY: killing a worker process of this test's cluster.
    unsafe { libc::kill(owner as i32, libc::SIGKILL) };
    wait_until("the dead owner's object to leave the store", Duration::from_secs(20), || store_bytes(&a.address) == 0);
    drop(cluster);
}

fn main() {
    harness::run(
        &[
            ("puts_beyond_capacity_spill_and_read_back", puts_beyond_capacity_spill_and_read_back),
            ("a_lost_chain_is_rebuilt_from_its_lineage", a_lost_chain_is_rebuilt_from_its_lineage),
            (
                "a_ref_returned_inside_a_list_lives_while_the_driver_holds_it",
                a_ref_returned_inside_a_list_lives_while_the_driver_holds_it,
            ),
            (
                "a_ref_passed_on_by_a_borrower_lives_while_the_last_holder_holds_it",
                a_ref_passed_on_by_a_borrower_lives_while_the_last_holder_holds_it,
            ),
            ("a_ref_read_inside_a_value_outlives_the_value", a_ref_read_inside_a_value_outlives_the_value),
            (
                "a_ref_read_out_of_an_argument_and_returned_lives_on",
                a_ref_read_out_of_an_argument_and_returned_lives_on,
            ),
            (
                "refs_an_actor_keeps_from_its_arguments_live_until_it_drops_them",
                refs_an_actor_keeps_from_its_arguments_live_until_it_drops_them,
            ),
            (
                "a_worker_holding_lent_objects_is_not_stopped_as_idle",
                a_worker_holding_lent_objects_is_not_stopped_as_idle,
            ),
            ("arrow_batches_read_back_without_copies", arrow_batches_read_back_without_copies),
            (
                "a_large_object_moves_between_nodes_and_every_copy_is_freed",
                a_large_object_moves_between_nodes_and_every_copy_is_freed,
            ),
            ("a_dead_owners_objects_leave_its_node", a_dead_owners_objects_leave_its_node),
        ],
        Duration::from_secs(240),
    );
}
