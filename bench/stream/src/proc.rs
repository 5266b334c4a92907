//! What `/proc` says about a process and the machine: CPU time and resident memory.

/// `/proc` counts CPU time in USER_HZ ticks, 100 a second on every Linux ABI.
pub const TICK_US: u64 = 10_000;

/// User + system CPU time of process `pid` (`self` for this one), in µs.
pub fn cpu_us(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_us_of_stat(&stat)
}

/// utime + stime (the 14th and 15th fields) of a `/proc/PID/stat` line, in µs.
fn cpu_us_of_stat(stat: &str) -> Option<u64> {
    // The name, in parentheses, may hold spaces: count from after it.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks * TICK_US)
}

/// Resident memory (VmRSS) of process `pid`, in KiB.
pub fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The machine's busy and idle CPU time so far, in ticks (`/proc/stat`'s `cpu` line).
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
    Some((busy, v.get(3)? + v.get(4)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_a_name_with_spaces() {
        let stat = "42 (a b) c) S 1 1 1 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 100 0 0";
        assert_eq!(cpu_us_of_stat(stat), Some(325 * TICK_US));
    }

    #[test]
    fn this_process_has_memory_and_has_spent_time() {
        assert!(rss_kib("self").unwrap() > 100);
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(30) {}
        assert!(cpu_us("self").unwrap() > 0);
        let (busy, idle) = machine_ticks().unwrap();
        assert!(busy + idle > 0);
    }
}
