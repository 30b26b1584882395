//! ionet-object-store (being written).
