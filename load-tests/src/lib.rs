//! Shared by the load-test binaries: reading the machine (CPU time and memory from /proc, the date, server
//! pids), and the whole-system load test's pieces (scenario files, the simulated fleet, the counting, SVG plots).

pub mod fleet;
pub mod machine;
pub mod scenario;
pub mod stats;
pub mod svg;
