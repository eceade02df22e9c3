//! In-process stand-in for Redis, for `dtfed demo` without a Redis URL. Same semantics as
//! [`super::redis::RedisBus`] inside one process.
