//! The Redis bus: Lua for the atomic fan-out step, Pub/Sub for live delivery.
