//! Agent configuration: YAML file and command-line overrides.
