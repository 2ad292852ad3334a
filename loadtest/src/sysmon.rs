//! CPU time and memory of a process from `/proc`, and Prometheus text scraping.

use std::collections::BTreeMap;

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ, 100 on Linux everywhere).
const USER_HZ: f64 = 100.0;

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ProcSample {
    /// User + system CPU seconds since the process started.
    pub cpu_seconds: f64,
    pub user_seconds: f64,
    pub system_seconds: f64,
    pub rss_bytes: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status` (`pid` = "self" for this process).
pub fn sample(pid: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (utime, stime) = parse_stat_times(&stat)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Some(ProcSample {
        cpu_seconds: (utime + stime) as f64 / USER_HZ,
        user_seconds: utime as f64 / USER_HZ,
        system_seconds: stime as f64 / USER_HZ,
        rss_bytes: rss_kb * 1024,
    })
}

/// utime and stime (fields 14 and 15) of a `/proc/<pid>/stat` line; the command name (field
/// 2) may contain spaces and parentheses, so fields are counted after its closing parenthesis.
pub fn parse_stat_times(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 → index 11.
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// Parses Prometheus text exposition into `name{labels}` → value.
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.trim().to_owned(), v.trim().parse::<f64>().ok()?))
        })
        .collect()
}

/// Sum of every series of metric `name` (all label sets).
pub fn metric_sum(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    m.iter().filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{"))).map(|(_, v)| v).sum()
}

/// `after - before` for every counter that changed.
pub fn metrics_delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter_map(|(k, a)| {
            let d = a - before.get(k).copied().unwrap_or(0.0);
            (d != 0.0).then(|| (k.clone(), d))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_with_awkward_command_names() {
        let line = "1234 (my (weird) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 5 0 100 1000 50";
        assert_eq!(parse_stat_times(line), Some((250, 75)));
        assert!(sample("self").is_some_and(|s| s.rss_bytes > 0));
    }

    #[test]
    fn prometheus_sums_and_deltas() {
        let a = parse_prometheus("# HELP x\nwarbler_rtp_packets_forwarded_total{kind=\"audio\"} 10\nwarbler_rtp_packets_forwarded_total{kind=\"video\"} 5\nother 1\n");
        let b = parse_prometheus("warbler_rtp_packets_forwarded_total{kind=\"audio\"} 30\nwarbler_rtp_packets_forwarded_total{kind=\"video\"} 5\nother 1\n");
        assert_eq!(metric_sum(&a, "warbler_rtp_packets_forwarded_total"), 15.0);
        let d = metrics_delta(&a, &b);
        assert_eq!(d.len(), 1);
        assert_eq!(d["warbler_rtp_packets_forwarded_total{kind=\"audio\"}"], 20.0);
    }
}
