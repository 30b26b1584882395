//! The node daemon's view of the cluster, for spillback decisions and quotes: the
//! control store's node table turned into the scheduler's model. The conversion is the
//! control store's own, so the head and the nodes read node records the same way.

pub use ionet_gcs::placement_groups::node_view;
