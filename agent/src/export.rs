//! Span export: OTLP, OTLP/JSON file, terminal view.
