//! Shared by the load-test binaries: reading the machine (CPU time from /proc, the date, server pids).

pub mod machine;
