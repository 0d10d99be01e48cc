//! What the kernel knows: this process's CPU time per thread name and resident memory, and
//! the CPU time the hypervisor took from this machine (steal).

/// Linux reports thread times in clock ticks of USER_HZ, which is 100 on every Linux ABI.
const TICKS_PER_SECOND: f64 = 100.0;
const PAGE: u64 = 4096;

/// CPU seconds (user + system) used so far by this process's threads whose name starts
/// with `prefix` (tokio names every worker thread of a runtime alike).
pub fn thread_cpu_seconds(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .filter_map(|stat| {
            // pid (comm) state ... : comm may hold spaces, so split at the last ')'.
            let (head, rest) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1;
            if !name.starts_with(prefix) {
                return None;
            }
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // After the comm: state is field 3 of stat; utime and stime are fields 14 and 15.
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / TICKS_PER_SECOND)
        })
        .sum()
}

/// CPU seconds, over all CPUs, that the hypervisor gave to others while this machine had
/// work to run (the `steal` column of `/proc/stat`) since boot.
pub fn steal_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    // cpu user nice system idle iowait irq softirq steal ...
    let ticks: f64 = stat
        .lines()
        .next()?
        .split_whitespace()
        .nth(8)?
        .parse()
        .ok()?;
    Some(ticks / TICKS_PER_SECOND)
}

/// Steal seconds since `from` (a reading of [`steal_seconds`]); 0 where there is none.
pub fn stolen_since(from: Option<f64>) -> f64 {
    steal_seconds()
        .zip(from)
        .map_or(0.0, |(now, from)| now - from)
}

/// `stolen` steal seconds as a share of all CPUs' time over `during`, in percent.
pub fn steal_percent(stolen: f64, during: std::time::Duration) -> f64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    stolen * 100.0 / (during.as_secs_f64() * cpus)
}

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_named_thread_shows_cpu_time_and_rss_is_read() {
        // Spin until the reading shows 0.2 s of CPU: a reader that does not see the thread's
        // time (or sees another's) never gets there before the deadline.
        let busy = std::thread::Builder::new()
            .name("benchburn".into())
            .spawn(|| {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                let mut x = 0u64;
                while thread_cpu_seconds("benchburn") < 0.2 && std::time::Instant::now() < deadline
                {
                    for _ in 0..100_000 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                }
                thread_cpu_seconds("benchburn")
            })
            .unwrap();
        let seen = busy.join().unwrap();
        assert!(
            seen >= 0.2,
            "the spinning thread's CPU time read as {seen} s"
        );
        assert_eq!(thread_cpu_seconds("no-such-thread"), 0.0);
        assert!(rss_bytes() > 1 << 20);
        assert!(steal_seconds().is_some(), "/proc/stat has a steal column");
    }
}
