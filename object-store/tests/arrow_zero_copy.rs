//! Arrow record batches stored as IPC streams and read back without copying.

mod common;

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{Array, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use common::{id, store, MIB};
use ionet_object_store::{decode_record_batch, encode_record_batch, ObjectStoreError, StoreClient};

fn batch(rows: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("score", DataType::Float64, true),
        Field::new("name", DataType::Utf8, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(0..rows)),
            Arc::new(Float64Array::from_iter((0..rows).map(|n| (n % 7 != 0).then_some(n as f64 * 0.5)))),
            Arc::new(StringArray::from_iter_values((0..rows).map(|n| format!("row-{n}")))),
        ],
    )
    .unwrap()
}

#[test]
fn a_record_batch_round_trips_without_copying_columns() {
    let store = store(256 * MIB);
    let original = batch(1_000_000);
    let bytes = encode_record_batch(&original).unwrap();
    store.put(id(1), &bytes).unwrap();
    drop(bytes);

    // Read from another "process": a client mapping of the store directory.
    let view = StoreClient::open(store.dir()).unwrap().map(&id(1)).unwrap();
    let mapped = view.as_ptr() as usize..view.as_ptr() as usize + view.len();
    let decoded = decode_record_batch(&view).unwrap();
    assert_eq!(decoded, original);

    let ids = decoded.column(0).as_primitive::<Int64Type>();
    let ids_start = ids.values().as_ptr() as usize;
    assert!(mapped.contains(&ids_start), "int column was copied out of the mapping");
    assert!(mapped.contains(&(ids_start + ids.len() * 8 - 1)));
    let scores = decoded.column(1).as_primitive::<Float64Type>();
    assert!(mapped.contains(&(scores.values().as_ptr() as usize)));
    assert!(mapped.contains(&(scores.nulls().unwrap().buffer().as_ptr() as usize)));
    let names = decoded.column(2).as_string::<i32>();
    assert!(mapped.contains(&(names.values().as_ptr() as usize)));

    // The batch keeps the mapping alive after the view and even the object are gone.
    drop(view);
    store.delete(&id(1)).unwrap();
    assert_eq!(decoded.column(0).as_primitive::<Int64Type>().value(999_999), 999_999);
    assert_eq!(decoded.column(2).as_string::<i32>().value(3), "row-3");
}

#[test]
fn bytes_that_are_not_arrow_are_refused() {
    let store = store(64 * MIB);
    let view = store.put(id(2), b"definitely not an arrow stream").unwrap();
    let err = decode_record_batch(&view).unwrap_err();
    assert!(matches!(err, ObjectStoreError::Arrow { .. }), "{err}");
    let empty = store.put(id(3), &[]).unwrap();
    assert!(decode_record_batch(&empty).is_err());
}
