//! Upstream OAuth: tokens the broker obtained at upstream authorization servers, per caller.
pub mod store;
