//! What the benchmarks read off the machine they run on: process CPU time and resident memory, the date, a
//! server's pid.

/// `date -u`, ISO 8601.
pub fn date_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The pid of the nats-server listening on `port` (from /proc/*/cmdline), to measure its CPU time.
pub fn find_server_pid(port: u16) -> Option<u32> {
    let port = port.to_string();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_server = args.first()?.ends_with(b"nats-server");
            let on_port = args
                .windows(2)
                .any(|w| w[0] == b"-p" && w[1] == port.as_bytes());
            (is_server && on_port).then_some(pid)
        })
}

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_seconds(stat_path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces; field 3 comes first.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Busy CPU seconds of the whole machine (user, nice, system, irq, softirq) and stolen seconds, from /proc/stat.
pub fn system_cpu_seconds() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let busy = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| fields.get(i).copied().unwrap_or(0.0))
        .sum::<f64>();
    let steal = fields.get(7).copied().unwrap_or(0.0);
    Some((busy / clock_ticks(), steal / clock_ticks()))
}

/// Busy CPU seconds of the whole machine (see [`system_cpu_seconds`]).
pub fn system_busy_seconds() -> Option<f64> {
    system_cpu_seconds().map(|(busy, _)| busy)
}

/// The machine in one line: CPUs and model, memory, kernel.
pub fn description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    format!(
        "{} CPUs ({model}), {memory} memory, kernel {kernel}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

/// Resident memory of a process, from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// VmRSS: everything resident (= anon + file + shmem).
    pub rss_kib: u64,
    /// RssAnon: private memory (heap, stacks): what a leak grows.
    pub anon_kib: u64,
    /// RssFile: mapped files (the binary, libraries).
    pub file_kib: u64,
    /// RssShmem: shared memory touched (for Postgres, the pages of shared buffers this backend has read).
    pub shmem_kib: u64,
}

impl std::ops::Add for Memory {
    type Output = Memory;

    fn add(self, other: Memory) -> Memory {
        Memory {
            rss_kib: self.rss_kib + other.rss_kib,
            anon_kib: self.anon_kib + other.anon_kib,
            file_kib: self.file_kib + other.file_kib,
            shmem_kib: self.shmem_kib + other.shmem_kib,
        }
    }
}

/// The resident memory of `pid`; `None` when it is gone (or not readable).
pub fn memory(pid: u32) -> Option<Memory> {
    parse_status(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

fn parse_status(status: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        anon_kib: field("RssAnon:").unwrap_or(0),
        file_kib: field("RssFile:").unwrap_or(0),
        shmem_kib: field("RssShmem:").unwrap_or(0),
    })
}

/// The parent pid of `pid`, from `/proc/<pid>/stat` (field 4, after the parenthesised command name).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The children of `parent` whose command line contains `needle` (e.g. a Node server's script name).
pub fn children_with(parent: u32, needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| parent_pid(pid) == Some(parent))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read_in_kib() {
        let status = "Name:\tx\nVmPeak:\t  9 kB\nVmRSS:\t   12345 kB\nRssAnon:\t    1000 kB\nRssFile:\t   11000 kB\nRssShmem:\t     345 kB\n";
        assert_eq!(
            parse_status(status),
            Some(Memory {
                rss_kib: 12_345,
                anon_kib: 1_000,
                file_kib: 11_000,
                shmem_kib: 345
            })
        );
        assert_eq!(parse_status("Name:\tkthread\n"), None);
    }

    #[test]
    fn this_process_is_readable() {
        let me = memory(std::process::id()).expect("own status");
        assert!(me.rss_kib > 0 && me.rss_kib >= me.anon_kib);
        assert!(parent_pid(std::process::id()).is_some());
        assert!(cpu_seconds("/proc/self/stat").is_some());
    }
}
