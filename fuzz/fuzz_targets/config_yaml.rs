//! The YAML configuration: any text gives a configuration or an error that
//! names what is wrong, never a panic; a configuration that loads is valid.
#![no_main]

use agent::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_yaml(text) {
        Ok(config) => {
            assert!(config.validate().is_ok());
            let _ = config.span_settings();
            let _ = config.process_filter();
            let _ = config.sampler();
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
