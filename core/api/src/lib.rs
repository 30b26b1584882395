//! ionet (being written)
