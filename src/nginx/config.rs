//! What the supervisor reads in nginx's config: directives in the dump of `nginx -T`, and
//! nginx's time values.

use std::time::Duration;

/// The value of `directive` where a config dump sets it (outside comments), as written.
pub fn directive_value(config_dump: &str, directive: &str) -> Option<String> {
    config_dump.lines().find_map(|line| {
        let line = line.trim_start();
        if line.starts_with('#') {
            return None;
        }
        let mut words = line
            .split(|c: char| c.is_whitespace() || c == ';')
            .filter(|w| !w.is_empty());
        (words.next() == Some(directive)).then(|| words.next().unwrap_or_default().to_owned())
    })
}

/// An nginx time value (`30s`, `1m`, `500ms`; a bare number is seconds, as nginx reads it).
pub fn time(value: &str) -> Option<Duration> {
    crate::duration::parse(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directive_counts_only_where_it_is_set() {
        for (dump, value) in [
            ("worker_shutdown_timeout 10s;\n", Some("10s")),
            ("events {}\n    worker_shutdown_timeout 1m;\n", Some("1m")),
            ("worker_shutdown_timeout 30;\n", Some("30")),
            ("# worker_shutdown_timeout 10s;\n", None),
            ("worker_shutdown_timeouts 10s;\n", None),
            ("", None),
        ] {
            assert_eq!(
                directive_value(dump, "worker_shutdown_timeout").as_deref(),
                value,
                "{dump:?}"
            );
        }
    }

    #[test]
    fn time_values_read_as_nginx_reads_them() {
        assert_eq!(time("30"), Some(Duration::from_secs(30)));
        assert_eq!(time("10s"), Some(Duration::from_secs(10)));
        assert_eq!(time("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(time("1m"), Some(Duration::from_secs(60)));
        assert_eq!(time("soon"), None);
    }
}
