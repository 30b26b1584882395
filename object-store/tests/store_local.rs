//! The node-local store: round trips, other processes, zero copy, spilling, pinning,
//! capacity errors, deletion and cleanup.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{contents, fill, id, matches, store, MIB};
use ionet_common::IonetError;
use ionet_object_store::{ObjectStoreError, StoreClient};

#[test]
fn put_then_get_round_trips() {
    let store = store(64 * MIB);
    let data = contents(3 * MIB + 17, 1);
    store.put(id(1), &data).unwrap();
    let view = store.get(&id(1)).unwrap().expect("object is there");
    assert_eq!(&view[..], &data[..]);
    assert_eq!(view.id(), id(1));
    assert!(store.get(&id(2)).unwrap().is_none());

    let empty = store.put(id(3), &[]).unwrap();
    assert!(empty.is_empty());
    assert!(store.get(&id(3)).unwrap().unwrap().is_empty());

    let err = store.put(id(1), b"again").unwrap_err();
    assert!(matches!(err, ObjectStoreError::AlreadyExists { .. }), "{err}");
}

#[test]
fn unsealed_objects_are_invisible_until_sealed() {
    let store = store(64 * MIB);
    let mut created = store.create(id(1), 1000).unwrap();
    fill(created.as_mut_slice(), 7);
    assert!(store.get(&id(1)).unwrap().is_none());
    let client = StoreClient::open(store.dir()).unwrap();
    assert!(matches!(client.map(&id(1)), Err(ObjectStoreError::NotFound { .. })));
    drop(created);
    store.seal(&id(1)).unwrap();
    assert!(matches(&client.map(&id(1)).unwrap(), 1000, 7));
    assert!(matches!(store.seal(&id(1)), Err(ObjectStoreError::AlreadyExists { .. })));
}

#[test]
fn a_second_client_on_the_directory_sees_the_same_bytes() {
    let store = store(64 * MIB);
    let data = contents(MIB, 2);
    store.put(id(1), &data).unwrap();
    let client = StoreClient::open(store.dir()).unwrap();
    assert_eq!(&client.map(&id(1)).unwrap()[..], &data[..]);

    // The other direction: a client writes an object the store never created; sealing
    // accounts it.
    client.write_unsealed(&id(2), 2 * MIB, |buf| fill(buf, 3)).unwrap();
    assert_eq!(store.stats().bytes_in_memory, MIB);
    store.seal(&id(2)).unwrap();
    assert_eq!(store.stats().bytes_in_memory, 3 * MIB);
    assert!(matches(&store.get(&id(2)).unwrap().unwrap(), 2 * MIB, 3));
    assert!(matches(&client.map(&id(2)).unwrap(), 2 * MIB, 3));
}

const CHILD_SPEC: &str = "IONET_OBJECT_STORE_TEST_CHILD";

/// Run as a child process by `another_process_writes_what_the_owner_seals`: writes the
/// object the parent created, knowing only the directory.
#[test]
fn child_process_writer() {
    let Ok(spec) = std::env::var(CHILD_SPEC) else {
        return; // Only does something as the child.
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let client = StoreClient::open(parts[0]).unwrap();
    let id: ionet_common::ObjectId = parts[1].parse().unwrap();
    let size: u64 = parts[2].parse().unwrap();
    let seed: u64 = parts[3].parse().unwrap();
    client.write_unsealed(&id, size, |buf| fill(buf, seed)).unwrap();
}

#[test]
fn another_process_writes_what_the_owner_seals() {
    let store = store(64 * MIB);
    let size = 5 * MIB + 3;
    let created = store.create(id(9), size).unwrap();
    assert!(created.path().starts_with(store.dir()));
    drop(created);

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_process_writer", "--exact", "--test-threads=1", "--quiet"])
        .env(CHILD_SPEC, format!("{}|{}|{size}|42", store.dir().display(), id(9).hex()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "child process did not finish");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "child failed: {status}");

    let view = store.seal(&id(9)).unwrap();
    assert!(matches(&view, size, 42));
    assert_eq!(store.stats().bytes_in_memory, size);
}

/// The address ranges of this process's mappings of `path`.
fn mappings_of(path: &std::path::Path) -> Vec<(usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let path = path.to_str().unwrap();
    maps.lines()
        .filter(|line| line.ends_with(path))
        .map(|line| {
            let range = line.split_whitespace().next().unwrap();
            let (start, end) = range.split_once('-').unwrap();
            (usize::from_str_radix(start, 16).unwrap(), usize::from_str_radix(end, 16).unwrap())
        })
        .collect()
}

#[test]
fn gets_are_zero_copy_views_of_the_shared_file() {
    let store = store(64 * MIB);
    let data = contents(8 * MIB, 5);
    store.put(id(1), &data).unwrap();
    let first = store.get(&id(1)).unwrap().unwrap();
    let second = store.get(&id(1)).unwrap().unwrap();
    // One mapping, shared while alive: a get copies nothing.
    assert_eq!(first.as_ptr(), second.as_ptr());
    assert!(first.same_mapping(&second));

    let path = store.dir().join(id(1).hex());
    let inside = |ptr: *const u8, len: usize| {
        let (start, end) = (ptr as usize, ptr as usize + len);
        mappings_of(&path).iter().any(|&(lo, hi)| lo <= start && end <= hi)
    };
    assert!(inside(first.as_ptr(), first.len()), "view is not a mapping of {}", path.display());

    // A client's mapping is a different mapping of the same file.
    let client_view = StoreClient::open(store.dir()).unwrap().map(&id(1)).unwrap();
    assert_ne!(client_view.as_ptr(), first.as_ptr());
    assert!(inside(client_view.as_ptr(), client_view.len()));
    assert_eq!(&client_view[..], &data[..]);
}

#[test]
fn a_small_store_takes_eight_times_its_capacity_by_spilling() {
    let capacity = 64 * MIB;
    let store = store(capacity);
    let size = 16 * MIB;
    let count = 32; // 512 MiB
    let mut buf = vec![0u8; size as usize];
    for n in 0..count {
        fill(&mut buf, n as u64);
        store.put(id(n), &buf).unwrap();
        let stats = store.stats();
        assert!(stats.bytes_in_memory <= capacity, "{stats:?}");
    }
    let stats = store.stats();
    assert_eq!(stats.objects_in_memory, 4);
    assert_eq!(stats.objects_spilled, 28);
    assert_eq!(stats.bytes_spilled, 28 * size);
    // Least recently used went first: the last four are the ones in memory.
    let client = StoreClient::open(store.dir()).unwrap();
    assert!((0..28).all(|n| !client.contains(&id(n))));
    assert!((28..32).all(|n| client.contains(&id(n))));

    for n in 0..count {
        let view = store.get(&id(n)).unwrap().expect("restored on demand");
        assert!(matches(&view, size, n as u64), "object {n} differs");
        assert!(store.stats().bytes_in_memory <= capacity);
    }
}

#[test]
fn pinned_objects_are_never_spilled() {
    let store = store(64 * MIB);
    let client = StoreClient::open(store.dir()).unwrap();
    store.put(id(0), &contents(16 * MIB, 0)).unwrap();
    let pinned = store.pin(&id(0)).unwrap();
    for n in 1..12 {
        store.put(id(n), &contents(16 * MIB, n as u64)).unwrap();
        assert!(client.contains(&id(0)), "pinned object spilled at put {n}");
    }
    assert!(matches(&pinned, 16 * MIB, 0));
    assert_eq!(store.stats().bytes_pinned, 16 * MIB);

    store.unpin(&id(0)).unwrap();
    assert!(matches!(store.unpin(&id(0)), Err(ObjectStoreError::NotPinned { .. })));
    for n in 12..16 {
        store.put(id(n), &contents(16 * MIB, n as u64)).unwrap();
    }
    assert!(!client.contains(&id(0)), "unpinned object should have been spilled");
    // Pinning a spilled object restores it.
    let restored = store.pin(&id(0)).unwrap();
    assert!(matches(&restored, 16 * MIB, 0));
    assert!(client.contains(&id(0)));
}

#[test]
fn a_store_full_of_pinned_objects_refuses_clearly() {
    let store = store(64 * MIB);
    for n in 0..4 {
        store.put(id(n), &contents(16 * MIB, n as u64)).unwrap();
        store.pin(&id(n)).unwrap();
    }
    let err = store.put(id(10), &contents(MIB, 10)).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ObjectStoreError::ObjectStoreFull { .. }), "{message}");
    assert!(message.contains(&id(10).short()), "{message}");
    assert!(message.contains(&MIB.to_string()), "{message}");
    assert!(message.contains(&(64 * MIB).to_string()), "{message}");
    assert!(err.is_retryable());
    assert!(matches!(IonetError::from(err), IonetError::ResourceExhausted(_)));
    // Nothing was left behind by the refused put.
    assert_eq!(store.stats().bytes_in_memory, 64 * MIB);
    assert!(store.get(&id(10)).unwrap().is_none());

    // An object being written holds its room too.
    store.unpin(&id(0)).unwrap();
    let _writing = store.create(id(11), 16 * MIB).unwrap();
    let err = store.put(id(12), &[1]).unwrap_err();
    assert!(matches!(err, ObjectStoreError::ObjectStoreFull { .. }), "{err}");

    let err = store.put(id(13), &vec![0u8; (64 * MIB + 1) as usize]).unwrap_err();
    assert!(matches!(err, ObjectStoreError::ObjectTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("larger than the store's whole capacity"), "{err}");
    assert!(!err.is_retryable());
    assert!(matches!(IonetError::from(err), IonetError::InvalidArgument(_)));
}

#[test]
fn delete_frees_memory_and_spill_and_stats_return_to_zero() {
    let store = store(64 * MIB);
    for n in 0..8 {
        store.put(id(n), &contents(16 * MIB, n as u64)).unwrap();
    }
    let kept_view = store.get(&id(7)).unwrap().unwrap();
    let stats = store.stats();
    assert_eq!(stats.objects_spilled, 4);
    assert_eq!(stats.bytes_in_memory, 64 * MIB);

    assert!(store.delete(&id(0)).unwrap()); // spilled
    assert!(store.delete(&id(7)).unwrap()); // in memory, still mapped
    assert!(!store.delete(&id(7)).unwrap());
    let stats = store.stats();
    assert_eq!(stats.bytes_in_memory, 48 * MIB);
    assert_eq!(stats.bytes_spilled, 48 * MIB);
    // A view taken before the delete still reads the object.
    assert!(matches(&kept_view, 16 * MIB, 7));

    let _unsealed = store.create(id(20), MIB).unwrap();
    for n in 0..21 {
        store.delete(&id(n)).unwrap();
    }
    let stats = store.stats();
    assert_eq!(
        (stats.bytes_in_memory, stats.bytes_spilled, stats.objects_in_memory, stats.objects_spilled),
        (0, 0, 0, 0)
    );
    assert_eq!(stats.objects_unsealed, 0);
    // What is left in memory is the files kept for reuse (id 7's was still mapped, so it
    // went), at most half the capacity, and counted.
    let kept: Vec<_> = std::fs::read_dir(store.dir()).unwrap().map(|entry| entry.unwrap()).collect();
    assert!(kept.iter().all(|entry| entry.file_name().to_string_lossy().starts_with("free-")), "{kept:?}");
    let kept_bytes: u64 = kept.iter().map(|entry| entry.metadata().unwrap().len()).sum();
    assert_eq!(kept_bytes, stats.bytes_free_for_reuse);
    assert!(kept_bytes > 0 && kept_bytes <= 32 * MIB, "{kept_bytes}");
    assert_eq!(std::fs::read_dir(store.spill_dir()).unwrap().count(), 0);
}

#[test]
fn dropping_the_store_removes_its_directories() {
    let store = store(64 * MIB);
    store.put(id(1), &contents(MIB, 1)).unwrap();
    let (dir, spill_dir) = (store.dir().to_path_buf(), store.spill_dir().to_path_buf());
    assert!(dir.starts_with("/dev/shm") || !std::path::Path::new("/dev/shm").exists());
    drop(store);
    assert!(!dir.exists());
    assert!(!spill_dir.exists());
}

#[test]
fn errors_map_onto_the_shared_error() {
    let err = ObjectStoreError::NotFound { id: id(1) };
    assert_eq!(err.to_string(), format!("object {} is not in the store", id(1).short()));
    assert!(matches!(IonetError::from(err), IonetError::NotFound(_)));
    let status: tonic::Status = ObjectStoreError::AlreadyExists { id: id(1) }.into();
    assert_eq!(status.code(), tonic::Code::AlreadyExists);
}

fn inode(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

fn object_file(store: &ionet_object_store::LocalObjectStore, n: u8) -> std::path::PathBuf {
    store.dir().join(id(n).hex())
}

#[test]
fn a_deleted_objects_file_is_reused_for_the_next_object_of_its_size() {
    let store = store(64 * MIB);
    store.put(id(1), &contents(4 * MIB, 1)).unwrap();
    let first = inode(&object_file(&store, 1));
    assert!(store.delete(&id(1)).unwrap());
    assert_eq!(store.stats().bytes_in_memory, 0, "a free file is not counted as used");

    // A client writes the next object through the owner's create, as workers do.
    let mut created = store.create(id(2), 3 * MIB).unwrap();
    fill(created.as_mut_slice(), 9);
    drop(created);
    store.seal(&id(2)).unwrap();
    assert_eq!(inode(&object_file(&store, 2)), first, "the free file was reused");
    assert!(matches(&store.get(&id(2)).unwrap().unwrap(), 3 * MIB, 9));
    assert_eq!(store.stats().bytes_in_memory, 3 * MIB);

    // Too small to be worth keeping: unlinked.
    store.put(id(3), &contents(100 * 1024, 3)).unwrap();
    assert!(store.delete(&id(3)).unwrap());
    assert_eq!(free_files(&store), 0);
    // More than twice smaller than the free file: a fresh file, the free one stays.
    assert!(store.delete(&id(2)).unwrap());
    assert_eq!(free_files(&store), 1);
    store.put(id(4), &contents(MIB, 4)).unwrap();
    assert_ne!(inode(&object_file(&store, 4)), first);
    assert_eq!(free_files(&store), 1);
}

fn free_files(store: &ionet_object_store::LocalObjectStore) -> usize {
    std::fs::read_dir(store.dir())
        .unwrap()
        .filter(|entry| entry.as_ref().unwrap().file_name().to_string_lossy().starts_with("free-"))
        .count()
}

#[test]
fn a_file_still_mapped_by_a_reader_is_never_reused() {
    let store = store(64 * MIB);
    store.put(id(1), &contents(2 * MIB, 1)).unwrap();
    let first = inode(&object_file(&store, 1));
    // A reader in another "process": its own descriptor and mapping.
    let reader = StoreClient::open(store.dir()).unwrap().map(&id(1)).unwrap();
    assert!(store.delete(&id(1)).unwrap());
    store.put(id(2), &contents(2 * MIB, 2)).unwrap();
    assert_ne!(inode(&object_file(&store, 2)), first, "a mapped file is unlinked, not reused");
    assert_eq!(&reader[..], &contents(2 * MIB, 1)[..], "the reader still sees the deleted object");

    // Once the reader is gone the next deletion recycles.
    drop(reader);
    let second = inode(&object_file(&store, 2));
    assert!(store.delete(&id(2)).unwrap());
    store.put(id(3), &contents(2 * MIB, 3)).unwrap();
    assert_eq!(inode(&object_file(&store, 3)), second);
    assert_eq!(&store.get(&id(3)).unwrap().unwrap()[..], &contents(2 * MIB, 3)[..]);
}

#[test]
fn free_files_give_way_before_anything_is_spilled() {
    // Free files may hold half the capacity; here one of 2 MiB, in 16 MiB.
    let store = store(16 * MIB);
    store.put(id(1), &contents(2 * MIB, 1)).unwrap();
    assert!(store.delete(&id(1)).unwrap());
    assert_eq!(free_files(&store), 1);
    // 17 objects of 960 KiB (below the recycling size) fill 16,320 KiB of 16,384: the
    // free file's 2 MiB must go, and nothing may be spilled.
    let size = 960 * 1024;
    for n in 2..19u8 {
        store.put(id(n), &contents(size, n as u64)).unwrap();
    }
    let stats = store.stats();
    assert_eq!(stats.bytes_in_memory, 17 * size);
    assert_eq!(stats.objects_spilled, 0, "the free file was dropped instead of spilling an object");
    assert_eq!(free_files(&store), 0);
    for n in 2..19u8 {
        assert_eq!(&store.get(&id(n)).unwrap().unwrap()[..], &contents(size, n as u64)[..]);
    }
}
