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
