//! Times as SPIRE's command line prints and reads them: Go's `time.Time` in UTC with whole
//! seconds, `2024-05-02 19:57:36 +0000 UTC`, and back. Pure formatting: no clock, no time
//! zone database.

/// Unix seconds as `YYYY-MM-DD hh:mm:ss +0000 UTC`.
pub fn utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} +0000 UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds of a time in SPIRE's filter layout `2006-01-02 15:04:05 -0700 -07` (the zone
/// name after the offset, if any, is not read); `None` when it is not one.
pub fn parse_go(s: &str) -> Option<i64> {
    let mut parts = s.split_whitespace();
    let (date, time, offset) = (parts.next()?, parts.next()?, parts.next()?);
    // Fixed widths and ranges, as Go's layout demands.
    let num = |v: Option<&str>, width: usize, lo: i64, hi: i64| -> Option<i64> {
        let v = v?;
        if v.len() != width || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        v.parse::<i64>().ok().filter(|n| (lo..=hi).contains(n))
    };
    let mut d = date.split('-');
    let (y, mo) = (num(d.next(), 4, 0, 9999)?, num(d.next(), 2, 1, 12)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = match mo {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    let da = num(d.next(), 2, 1, days_in_month)?;
    let mut t = time.split(':');
    let (h, mi, se) = (
        num(t.next(), 2, 0, 23)?,
        num(t.next(), 2, 0, 59)?,
        num(t.next(), 2, 0, 59)?,
    );
    if d.next().is_some() || t.next().is_some() {
        return None;
    }
    let (sign, hhmm) = match offset.split_at_checked(1)? {
        ("+", r) => (1, r),
        ("-", r) => (-1, r),
        _ => return None,
    };
    if hhmm.len() != 4 {
        return None;
    }
    let off =
        sign * (num(Some(&hhmm[..2]), 2, 0, 23)? * 3600 + num(Some(&hhmm[2..]), 2, 0, 59)? * 60);
    Some(days_from_civil(y, mo, da) * 86_400 + h * 3600 + mi * 60 + se - off)
}

#[cfg(test)]
mod tests {
    use super::{parse_go, utc};

    #[test]
    fn go_filter_times_parse_back() {
        assert_eq!(
            parse_go("2024-05-02 19:57:36 +0000 UTC"),
            Some(1_714_679_856)
        );
        assert_eq!(
            parse_go("2024-05-02 21:57:36 +0200 +02"),
            Some(1_714_679_856)
        );
        assert_eq!(
            parse_go("2000-02-29 00:00:00 -0700 -07"),
            Some(951_782_400 + 7 * 3600)
        );
        assert_eq!(parse_go("2024-13-02 19:57:36 +0000 UTC"), None);
        assert_eq!(parse_go("2024-02-31 00:00:00 +0000 UTC"), None);
        assert_eq!(parse_go("2023-02-29 00:00:00 +0000 UTC"), None);
        assert_eq!(parse_go("2024-2-01 00:00:00 +0000 UTC"), None);
        assert_eq!(parse_go("2024-02-01 00:00:60 +0000 UTC"), None);
        assert_eq!(parse_go("yesterday"), None);
        for t in [0, 951_782_400, 1_714_679_856, 4_102_444_800] {
            assert_eq!(parse_go(&utc(t)), Some(t));
        }
    }

    #[test]
    fn utc_formats_like_spire() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 +0000 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 +0000 UTC");
        assert_eq!(utc(1_714_679_856), "2024-05-02 19:57:36 +0000 UTC");
    }
}
