//! Parsing of the human units used in `gateway.toml` and the CLI: durations, sizes, rate limits.

use std::time::Duration;

/// Parses a duration such as `500ms`, `30s`, `5m`, `1h`, `7d`, `2w` or `1y`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    if number.is_empty() {
        return Err(format!(
            "bad duration {text:?}: expected a number followed by ms, s, m, h, d, w or y (e.g. \"30s\")"
        ));
    }
    let n: u64 = number
        .parse()
        .map_err(|_| format!("bad duration {text:?}: number too large"))?;
    let unit_secs: u64 = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "y" => 365 * 86_400,
        _ => {
            return Err(format!(
                "bad duration {text:?}: unknown unit {unit:?} (use ms, s, m, h, d, w or y)"
            ))
        }
    };
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("bad duration {text:?}: too large"))
}

/// Parses a size such as `512`, `64KiB`, `10MiB`, `1GiB`, `10MB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("bad size {text:?}: expected e.g. \"10MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "bad size {text:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("bad size {text:?}: too large"))
}

/// A rate limit: `requests` per `period`, with a burst of `requests`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Requests allowed per period (also the burst).
    pub requests: u32,
    /// The period.
    pub period: Duration,
}

impl Limit {
    /// Parses `N/DURATION` (e.g. `1000/1h`, `10/s` meaning `10/1s`); `none` gives `None`.
    pub fn parse(text: &str) -> Result<Option<Limit>, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("none") {
            return Ok(None);
        }
        let (n, period) = text.split_once('/').ok_or_else(|| {
            format!("bad rate limit {text:?}: expected N/DURATION such as \"1000/1h\", or \"none\"")
        })?;
        let requests: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("bad rate limit {text:?}: {n:?} is not a whole number"))?;
        if requests == 0 {
            return Err(format!(
                "bad rate limit {text:?}: the count must be at least 1 (use \"none\" to disable)"
            ));
        }
        let period = period.trim();
        // Allow the unit alone ("10/s") as a shorthand for one of it.
        let period = if period.chars().all(|c| c.is_ascii_alphabetic()) {
            parse_duration(&format!("1{period}"))
        } else {
            parse_duration(period)
        }
        .map_err(|e| format!("bad rate limit {text:?}: {e}"))?;
        if period.is_zero() {
            return Err(format!(
                "bad rate limit {text:?}: the period must be longer than zero"
            ));
        }
        Ok(Some(Limit { requests, period }))
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.requests, format_duration(self.period))
    }
}

/// Formats a duration in the largest unit that divides it (`3600s` → `1h`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    for (unit, secs) in [("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60)] {
        if s >= secs && s % secs == 0 {
            return format!("{}{unit}", s / secs);
        }
    }
    format!("{s}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            parse_duration("1y").unwrap(),
            Duration::from_secs(365 * 86_400)
        );
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999y").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("10XB").is_err());
    }

    #[test]
    fn limits() {
        let l = Limit::parse("1000/1h").unwrap().unwrap();
        assert_eq!(l.requests, 1000);
        assert_eq!(l.period, Duration::from_secs(3600));
        assert_eq!(l.to_string(), "1000/1h");
        assert_eq!(
            Limit::parse("10/s").unwrap().unwrap().period,
            Duration::from_secs(1)
        );
        assert_eq!(Limit::parse("none").unwrap(), None);
        assert!(Limit::parse("0/1m").is_err());
        assert!(Limit::parse("10").is_err());
        assert!(Limit::parse("x/1m").is_err());
        assert!(Limit::parse("10/0s").is_err());
    }
}
