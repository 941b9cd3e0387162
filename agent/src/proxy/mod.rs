//! Transparent proxy that injects `traceparent` into outbound HTTP/1.x
//! requests reached through iptables REDIRECT. (Being written.)

pub mod rules;
