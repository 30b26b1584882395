//! Arrow tables as objects: the Arrow IPC stream format, read back without copying.
//!
//! [`decode_record_batch`] wraps the object's mapping in an `arrow_buffer::Buffer` whose
//! owner is the [`ObjectView`], and hands that buffer to arrow-ipc's `StreamDecoder`,
//! which slices whole messages out of it: column buffers point into the shared memory
//! and keep the mapping alive for as long as any array uses them. The IPC writer pads
//! buffers to 64 bytes and the mapping is page-aligned, so nothing needs realigning.

use std::ptr::NonNull;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use arrow_ipc::reader::StreamDecoder;
use arrow_ipc::writer::StreamWriter;

use crate::error::{ObjectStoreError, ObjectStoreResult};
use crate::view::ObjectView;

/// Encodes one record batch in the Arrow IPC stream format (schema, batch, end marker).
pub fn encode_record_batch(batch: &RecordBatch) -> Result<Vec<u8>, arrow_schema::ArrowError> {
    let mut bytes = Vec::new();
    let mut writer = StreamWriter::try_new(&mut bytes, &batch.schema())?;
    writer.write(batch)?;
    writer.finish()?;
    drop(writer);
    Ok(bytes)
}

/// The object's bytes as an Arrow buffer that borrows the mapping (no copy).
pub fn view_buffer(view: &ObjectView) -> Buffer {
    if view.is_empty() {
        return Buffer::from_vec(Vec::<u8>::new());
    }
    let ptr = NonNull::new(view.as_ptr() as *mut u8).expect("a mapping is never null");
    // SAFETY: `ptr..ptr+len` is the read-only mapping owned by `view`; the owner Arc keeps
    // it mapped for as long as the buffer or any slice of it lives, and the bytes of a
    // sealed object never change.
    unsafe { Buffer::from_custom_allocation(ptr, view.len(), Arc::new(view.clone())) }
}

/// Decodes every record batch of an IPC stream held in an object, zero-copy.
pub fn decode_record_batches(view: &ObjectView) -> ObjectStoreResult<Vec<RecordBatch>> {
    let arrow_error =
        |err: arrow_schema::ArrowError| ObjectStoreError::Arrow { id: view.id(), reason: err.to_string() };
    let mut buffer = view_buffer(view);
    let mut decoder = StreamDecoder::new();
    let mut batches = Vec::new();
    while !buffer.is_empty() {
        if let Some(batch) = decoder.decode(&mut buffer).map_err(arrow_error)? {
            batches.push(batch);
        }
    }
    decoder.finish().map_err(arrow_error)?;
    Ok(batches)
}

/// Decodes an object holding exactly one record batch, zero-copy.
pub fn decode_record_batch(view: &ObjectView) -> ObjectStoreResult<RecordBatch> {
    let mut batches = decode_record_batches(view)?;
    if batches.len() != 1 {
        return Err(ObjectStoreError::Arrow {
            id: view.id(),
            reason: format!("expected one record batch, found {}", batches.len()),
        });
    }
    Ok(batches.pop().expect("one batch"))
}
