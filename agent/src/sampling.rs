//! Percentage sampling decided from the trace id.
