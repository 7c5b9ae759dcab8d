//! Durations as people write them in flags and manifests, and as messages print them.

use std::time::Duration;

/// The longest duration any option takes: a grace period of a day is already far beyond what
/// a pod is given; past this the arithmetic on instants would overflow.
pub const LONGEST: Duration = Duration::from_secs(24 * 3600);

/// A duration like 500ms, 5s or 1m30s; a bare number is seconds, as in Kubernetes' own fields
/// (terminationGracePeriodSeconds), so a manifest can hand its value over as it is.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let duration = match s.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("`{s}` is not a duration like 500ms, 5s, 1m30s or 30 (seconds) ({e})"))?,
    };
    if duration > LONGEST {
        return Err(format!(
            "`{s}` is longer than {}, the longest any option takes: give the pod's real terminationGracePeriodSeconds",
            fmt(LONGEST)
        ));
    }
    Ok(duration)
}

/// A duration for messages, to the millisecond: the finest unit anyone sets here.
pub fn fmt(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_person_writes_them() {
        for (text, ms) in [
            ("5s", 5000),
            ("1m30s", 90_000),
            ("500ms", 500),
            ("0s", 0),
            (" 2s ", 2000),
            ("30", 30_000),
        ] {
            assert_eq!(parse(text), Ok(Duration::from_millis(ms)), "{text}");
        }
        for bad in ["", "five seconds", "-1s", "-5", "1.5"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        // Absurd lengths are refused with the limit, not accepted to overflow later.
        assert_eq!(parse("24h"), Ok(LONGEST));
        for absurd in ["24h 1s", "86401", "584542046090y", "18446744073709551615"] {
            let err = parse(absurd).unwrap_err();
            assert!(err.contains("longer than 1day"), "{absurd}: {err}");
        }
    }
}
