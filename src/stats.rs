//! Figures for operators (`GET /api/v1/stats` and the `/admin` console): this
//! node's, sampled once a second from its own Prometheus metrics, and every
//! node's, summed.
//!
//! Owns: the sampler (rates and the commit p99 over the last interval, from the
//! metrics' totals and histogram buckets) and the summing. Must not: count anything
//! itself (the metrics do), or reach other nodes except through the hub's broker
//! calls.

pub use crate::protocol::api::{ClusterStats, NodeStats};
use std::collections::HashMap;
use std::time::Instant;

/// The cluster's figures from each node's.
pub fn sum(mut nodes: Vec<NodeStats>) -> ClusterStats {
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    let mut s = ClusterStats {
        connections: 0,
        users: 0,
        rooms: 0,
        messages_per_sec: 0.0,
        deliveries_per_sec: 0.0,
        commit_p99_ms: 0.0,
        slow_consumer_closes: 0,
        rate_limit_closes: 0,
        nodes: Vec::new(),
    };
    for n in &nodes {
        s.connections += n.connections;
        // A user on two nodes counts on each: `users` is an upper bound.
        s.users += n.users;
        s.rooms += n.rooms;
        s.messages_per_sec += n.messages_per_sec;
        s.deliveries_per_sec += n.deliveries_per_sec;
        s.commit_p99_ms = s.commit_p99_ms.max(n.commit_p99_ms);
        s.slow_consumer_closes += n.slow_consumer_closes;
        s.rate_limit_closes += n.rate_limit_closes;
    }
    s.nodes = nodes;
    s
}

/// Every series of a Prometheus text exposition, by metric name and labels.
fn parse(text: &str) -> HashMap<&str, Vec<(&str, f64)>> {
    let mut out: HashMap<&str, Vec<(&str, f64)>> = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        out.entry(name).or_default().push((labels, value));
    }
    out
}

fn total(m: &HashMap<&str, Vec<(&str, f64)>>, name: &str) -> f64 {
    m.get(name).map_or(0.0, |v| v.iter().map(|(_, x)| x).sum())
}

/// A histogram's cumulative bucket counts, by upper bound (seconds).
fn buckets(m: &HashMap<&str, Vec<(&str, f64)>>, name: &str) -> Vec<(f64, f64)> {
    let mut b: Vec<(f64, f64)> = m
        .get(format!("{name}_bucket").as_str())
        .map(|v| {
            v.iter()
                .filter_map(|(labels, count)| {
                    let le = labels.split(',').find_map(|l| l.strip_prefix("le=\""))?;
                    let le = le.trim_end_matches('"');
                    let bound = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().ok()?
                    };
                    Some((bound, *count))
                })
                .collect()
        })
        .unwrap_or_default();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    b
}

/// The p99 (the upper bound of the bucket it falls in) of the observations
/// between two samples of a histogram's buckets; 0 when there were none.
fn p99_between(before: &[(f64, f64)], now: &[(f64, f64)]) -> f64 {
    let delta: Vec<(f64, f64)> = now
        .iter()
        .map(|(le, c)| {
            let prev = before.iter().find(|(b, _)| b == le).map_or(0.0, |x| x.1);
            (*le, c - prev)
        })
        .collect();
    let Some(&(_, count)) = delta.last() else {
        return 0.0;
    };
    if count <= 0.0 {
        return 0.0;
    }
    let want = count * 0.99;
    let mut last_finite = 0.0;
    for (le, c) in &delta {
        if le.is_finite() {
            last_finite = *le;
        }
        if *c >= want {
            return if le.is_finite() { *le } else { last_finite };
        }
    }
    last_finite
}

/// This node's sampler: call [`Sampler::sample`] about once a second.
#[derive(Default)]
pub struct Sampler {
    last: Option<Totals>,
}

/// The totals a rate is taken between: when, messages stored, deliveries, and the
/// commit histogram's cumulative buckets.
type Totals = (Instant, f64, f64, Vec<(f64, f64)>);

impl Sampler {
    /// This node's figures from its metrics text now.
    pub fn sample(&mut self, node: &str, draining: bool, text: &str, at: i64) -> NodeStats {
        let m = parse(text);
        let now = Instant::now();
        let stored = total(&m, "hubbub_messages_stored_total");
        let deliveries = total(&m, "hubbub_deliveries_total");
        let commits = buckets(&m, "hubbub_store_commit_seconds");
        let (messages_per_sec, deliveries_per_sec, commit_p99) = match &self.last {
            Some((t, s0, d0, b0)) => {
                let secs = now.duration_since(*t).as_secs_f64().max(0.001);
                (
                    ((stored - s0) / secs).max(0.0),
                    ((deliveries - d0) / secs).max(0.0),
                    p99_between(b0, &commits),
                )
            }
            None => (0.0, 0.0, 0.0),
        };
        self.last = Some((now, stored, deliveries, commits));
        let rate_limit_closes = m.get("hubbub_closes_total").map_or(0.0, |v| {
            v.iter()
                .filter(|(l, _)| l.contains("code=\"4029\""))
                .map(|(_, x)| x)
                .sum()
        });
        let connections = m.get("hubbub_connections").map_or(0.0, |v| {
            v.iter()
                .filter(|(l, _)| !l.contains("state=\"closing\""))
                .map(|(_, x)| x)
                .sum()
        });
        NodeStats {
            node: node.to_owned(),
            state: if draining { "draining" } else { "up" }.to_owned(),
            broker_up: total(&m, "hubbub_broker_up") >= 1.0,
            connections: connections.max(0.0) as u64,
            users: total(&m, "hubbub_users").max(0.0) as u64,
            rooms: total(&m, "hubbub_rooms").max(0.0) as u64,
            messages_per_sec,
            deliveries_per_sec,
            commit_p99_ms: commit_p99 * 1000.0,
            slow_consumer_closes: total(&m, "hubbub_slow_consumer_closes_total") as u64,
            rate_limit_closes: rate_limit_closes as u64,
            at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE hubbub_connections gauge\n\
        hubbub_connections{state=\"active\"} 3\n\
        hubbub_connections{state=\"awaiting_hello\"} 1\n\
        hubbub_connections{state=\"closing\"} 2\n\
        hubbub_users 2\n\
        hubbub_closes_total{code=\"4029\"} 5\n\
        hubbub_closes_total{code=\"1000\"} 9\n\
        hubbub_store_commit_seconds_bucket{le=\"0.001\"} 90\n\
        hubbub_store_commit_seconds_bucket{le=\"0.01\"} 99\n\
        hubbub_store_commit_seconds_bucket{le=\"0.1\"} 100\n\
        hubbub_store_commit_seconds_bucket{le=\"+Inf\"} 100\n";

    #[test]
    fn a_sample_sums_series_and_leaves_out_closing_connections() {
        let s = Sampler::default().sample("a", false, TEXT, 1);
        assert_eq!(s.connections, 4);
        assert_eq!(s.users, 2);
        assert_eq!(s.rate_limit_closes, 5, "only 4029 closes count");
        assert_eq!(s.state, "up");
    }

    #[test]
    fn the_p99_is_the_bucket_where_99_percent_of_the_new_observations_fall() {
        let before = [
            (0.001, 10.0),
            (0.01, 10.0),
            (0.1, 10.0),
            (f64::INFINITY, 10.0),
        ];
        let now = [
            (0.001, 100.0),
            (0.01, 109.0),
            (0.1, 110.0),
            (f64::INFINITY, 110.0),
        ];
        assert_eq!(p99_between(&before, &now), 0.01);
        assert_eq!(p99_between(&now, &now), 0.0, "no new observations");
    }

    #[test]
    fn the_cluster_sum_adds_counts_and_keeps_the_worst_p99() {
        let a = NodeStats {
            node: "b".into(),
            connections: 2,
            commit_p99_ms: 5.0,
            ..NodeStats::default()
        };
        let b = NodeStats {
            node: "a".into(),
            connections: 3,
            commit_p99_ms: 9.0,
            ..NodeStats::default()
        };
        let s = sum(vec![a, b]);
        assert_eq!(s.connections, 5);
        assert_eq!(s.commit_p99_ms, 9.0);
        assert_eq!(s.nodes[0].node, "a", "nodes by name");
    }
}
