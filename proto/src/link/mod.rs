//! Region link protocol (placeholder until the link lands).
