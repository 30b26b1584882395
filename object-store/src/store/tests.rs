use super::*;

#[test]
fn directories_of_dead_processes_are_reclaimed() {
    let root = tempfile::tempdir().unwrap();
    // No process has this id (above the kernel's pid limit); the live one is ours.
    let orphan = root.path().join("ionet-objects-999999999-dead");
    let live = root.path().join(format!("ionet-objects-{}-live", std::process::id()));
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::create_dir_all(&live).unwrap();
    let config = StoreConfig {
        root: Some(root.path().to_path_buf()),
        spill_root: Some(root.path().to_path_buf()),
        ..StoreConfig::with_capacity(1 << 20)
    };
    let store = LocalObjectStore::new(config).unwrap();
    assert!(!orphan.exists(), "the dead process's directory is removed");
    assert!(live.exists(), "a live process's directory is kept");
    drop(store);
}

fn id(n: u8) -> ObjectId {
    let mut bytes = [0u8; ObjectId::LEN];
    bytes[0] = n;
    ObjectId::from_array(bytes)
}

#[test]
fn a_streamed_object_is_written_in_pieces_then_sealed() {
    let store = LocalObjectStore::new(StoreConfig::with_capacity(3000)).unwrap();
    let object = store.create_streamed(id(1), 2000).unwrap();
    assert_eq!(store.stats().bytes_in_memory, 2000, "reserved at creation");
    object.write_at(&[1; 1500], 0).unwrap();
    object.write_at(&[2; 500], 1500).unwrap();
    assert!(object.write_at(&[3; 1], 2000).is_err(), "nothing past its end");
    assert!(store.get(&id(1)).unwrap().is_none(), "unreadable before its seal");
    drop(object);
    let view = store.seal(&id(1)).unwrap();
    assert_eq!(view.len(), 2000);
    assert!(view[..1500].iter().all(|&b| b == 1) && view[1500..].iter().all(|&b| b == 2));
    // Never more than the capacity; an aborted one gives its room back.
    assert!(store.create_streamed(id(2), 3001).is_err());
    let small = store.create_streamed(id(3), 1000).unwrap();
    drop(small);
    store.abort(&id(3)).unwrap();
    assert_eq!(store.stats().bytes_in_memory, 2000);
}

#[test]
fn a_get_makes_an_object_recently_used() {
    let store = LocalObjectStore::new(StoreConfig::with_capacity(3000)).unwrap();
    for n in 0..3 {
        store.put(id(n), &[n; 1000]).unwrap();
    }
    store.get(&id(0)).unwrap().unwrap();
    store.put(id(3), &[3; 1000]).unwrap();
    // Object 1 was the least recently used, not object 0.
    let inner = store.lock();
    assert!(inner.entries[&id(0)].in_memory);
    assert!(!inner.entries[&id(1)].in_memory);
    assert_eq!(inner.lru.len(), 3);
    assert_eq!(inner.bytes_in_memory, 3000);
}

#[test]
fn a_failed_create_releases_its_reservation() {
    let store = LocalObjectStore::new(StoreConfig::with_capacity(1000)).unwrap();
    store.create(id(1), 600).unwrap();
    assert!(matches!(store.create(id(1), 10), Err(ObjectStoreError::AlreadyExists { .. })));
    assert!(matches!(store.create(id(2), 600), Err(ObjectStoreError::ObjectStoreFull { .. })));
    store.abort(&id(1)).unwrap();
    assert_eq!(store.stats().bytes_in_memory, 0);
    store.create(id(2), 1000).unwrap();
}

/// A store whose writers are other users (a root daemon's jobs): names its writers plant
/// are never followed, sealed files are the store's and their group's alone, and a freed
/// file becomes an object of its own group only.
#[test]
fn writers_of_other_users_cannot_turn_the_store_on_other_files() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: only root stores objects for other users");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        root: Some(root.path().to_path_buf()),
        spill_root: Some(root.path().to_path_buf()),
        separate_users: true,
        ..StoreConfig::with_capacity(4 * RECYCLE_MIN_SIZE)
    };
    let store = LocalObjectStore::new(config).unwrap();
    assert_eq!(fs::metadata(store.dir()).unwrap().permissions().mode() & 0o7777, 0o1733);

    // A link planted as an object being written, pointing at a file of the machine's.
    let precious = root.path().join("precious");
    fs::write(&precious, b"not an object").unwrap();
    fs::set_permissions(&precious, fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&precious, layout::unsealed_path(store.dir(), &id(1))).unwrap();
    assert!(store.seal_for(&id(1), Some(4242)).is_err(), "a link is not sealed");
    let after = fs::metadata(&precious).unwrap();
    assert_eq!((after.gid(), after.permissions().mode() & 0o777), (0, 0o600), "its target is untouched");

    // A client's own file: sealed, it is the store's, the group's, 0440.
    let written = layout::unsealed_path(store.dir(), &id(2));
    fs::write(&written, vec![7u8; 100]).unwrap();
    std::os::unix::fs::chown(&written, Some(4243), Some(4243)).unwrap();
    store.seal_for(&id(2), Some(4242)).unwrap();
    let sealed = fs::metadata(layout::sealed_path(store.dir(), &id(2))).unwrap();
    assert_eq!((sealed.uid(), sealed.gid(), sealed.permissions().mode() & 0o777), (0, 4242, 0o440));

    // A restore never writes through a name planted in its place.
    store.put(id(3), &vec![3u8; RECYCLE_MIN_SIZE as usize]).unwrap();
    store.set_group(&id(3), 4242).unwrap();
    {
        let mut inner = store.lock();
        store.spill_locked(&mut inner, &id(3)).unwrap();
    }
    std::os::unix::fs::symlink(&precious, layout::restoring_path(store.dir(), &id(3))).unwrap();
    let restored = store.get(&id(3)).unwrap().unwrap();
    assert_eq!(restored.len(), RECYCLE_MIN_SIZE as usize);
    assert_eq!(fs::read(&precious).unwrap(), b"not an object", "the link's target is not overwritten");
    let sealed = fs::metadata(layout::sealed_path(store.dir(), &id(3))).unwrap();
    assert_eq!((sealed.gid(), sealed.permissions().mode() & 0o777), (4242, 0o440), "restored with its group");

    // Freed, a file waits as the store's alone, and becomes an object of its own group
    // only (a writer of that group may still map it), never another's.
    drop(restored);
    store.delete(&id(3)).unwrap();
    assert_eq!(store.stats().bytes_free_for_reuse, RECYCLE_MIN_SIZE);
    let waiting = fs::read_dir(store.dir())
        .unwrap()
        .flatten()
        .find(|entry| entry.file_name().to_string_lossy().starts_with("free-"))
        .expect("a free file")
        .metadata()
        .unwrap();
    assert_eq!(waiting.permissions().mode() & 0o777, 0o600);
    store.create_for_client(id(5), RECYCLE_MIN_SIZE, Some(4343)).unwrap();
    assert_eq!(store.stats().bytes_free_for_reuse, RECYCLE_MIN_SIZE, "another group's object gets a new file");
    let fresh = fs::metadata(layout::unsealed_path(store.dir(), &id(5))).unwrap();
    assert_ne!(fresh.ino(), waiting.ino());
    assert_eq!((fresh.gid(), fresh.permissions().mode() & 0o777), (4343, 0o660), "its writers' group may write it");
    store.create_for_client(id(6), RECYCLE_MIN_SIZE, Some(4242)).unwrap();
    assert_eq!(store.stats().bytes_free_for_reuse, 0, "the group's own object takes it");
    let reused = fs::metadata(layout::unsealed_path(store.dir(), &id(6))).unwrap();
    assert_eq!((reused.ino(), reused.gid(), reused.permissions().mode() & 0o777), (waiting.ino(), 4242, 0o660));
}

#[test]
fn a_listing_shows_sealed_objects_largest_first_and_says_when_it_was_cut() {
    let store = LocalObjectStore::new(StoreConfig::with_capacity(1 << 20)).unwrap();
    for n in 1..=4u8 {
        store.put(id(n), &vec![n; usize::from(n) * 100]).unwrap();
    }
    let _unsealed = store.create(id(9), 50).unwrap();
    let (all, more) = store.list(10);
    assert!(!more);
    assert_eq!(all.iter().map(|entry| entry.id).collect::<Vec<_>>(), vec![id(4), id(3), id(2), id(1)]);
    assert_eq!(all[0].size, 400);
    assert!(all.iter().all(|entry| entry.in_memory && !entry.spilled));
    let (two, more) = store.list(2);
    assert!(more);
    assert_eq!(two.iter().map(|entry| entry.size).collect::<Vec<_>>(), vec![400, 300]);
}
