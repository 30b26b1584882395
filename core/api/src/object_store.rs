//! Bytes of object values as the core worker holds them.

use std::sync::Arc;

/// An immutable, cheaply cloned byte buffer.
pub(crate) type Bytes = Arc<Vec<u8>>;
