//! SPIFFE IDs and trust domain names (SPIFFE-ID.md, rules ID-01..ID-13).
//!
//! Parsing is strict and byte-oriented, like go-spiffe and SPIRE: the scheme must be exactly
//! `spiffe` and the trust domain only `[a-z0-9._-]`. **ID-12 decision:** SPIFFE-ID §2.1 says the
//! trust domain MUST be lowercase while §2.4 calls scheme and trust domain case-insensitive.
//! Kame rejects any upper-case letter in the scheme or trust domain (as go-spiffe and SPIRE do)
//! instead of folding it, so an ID Kame accepts is accepted unchanged by every Go peer, and every
//! ID Kame produces is lowercase in scheme and trust domain. Paths are case-sensitive. No length
//! limit is applied when parsing (ID-11: IDs up to 2048 bytes MUST be supported and go-spiffe
//! accepts longer ones); issuers refuse to *produce* IDs longer than [`MAX_ID_LEN`].
//! This module does no I/O.

use std::fmt;

/// The longest SPIFFE ID Kame will put into an SVID or registration entry (ID-11).
pub const MAX_ID_LEN: usize = 2048;

const SCHEME_PREFIX: &str = "spiffe://";

/// Why a string is not a SPIFFE ID, trust domain or path. Messages follow go-spiffe's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("cannot be empty")]
    Empty,
    #[error("scheme is missing or invalid")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error(
        "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores"
    )]
    BadTrustDomainChar,
    #[error(
        "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
    )]
    BadPathSegmentChar,
    #[error("path cannot contain dot segments")]
    DotSegment,
    #[error("path must have a leading slash")]
    NoLeadingSlash,
    #[error("path cannot contain empty segments")]
    EmptySegment,
    #[error("path cannot have a trailing slash")]
    TrailingSlash,
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
}

fn is_td_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
}

fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_'
}

/// A validated trust domain name such as `example.org` (no scheme, no path).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name or a full SPIFFE ID (whose path is validated too, ID-13).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::MissingTrustDomain);
        }
        if s.contains(":/") {
            return Ok(SpiffeId::parse(s)?.trust_domain().clone());
        }
        validate_trust_domain_name(s)?;
        Ok(TrustDomain(s.to_string()))
    }

    /// The name, e.g. `example.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<name>` (the key used in Workload API bundle maps).
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.0)
    }

    /// `spiffe://<td><path>`, validating `path` (empty, or `/seg/seg`).
    pub fn id_from_path(&self, path: &str) -> Result<SpiffeId, IdError> {
        validate_path(path)?;
        Ok(SpiffeId {
            td: self.clone(),
            path: path.to_string(),
        })
    }

    /// `spiffe://<td>/<seg>/<seg>...`, validating each segment.
    pub fn id_from_segments(&self, segments: &[&str]) -> Result<SpiffeId, IdError> {
        let mut path = String::new();
        for seg in segments {
            validate_path_segment(seg)?;
            path.push('/');
            path.push_str(seg);
        }
        Ok(SpiffeId {
            td: self.clone(),
            path,
        })
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn validate_trust_domain_name(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if !td.bytes().all(is_td_char) {
        return Err(IdError::BadTrustDomainChar);
    }
    Ok(())
}

/// Validates a SPIFFE ID path: empty, or `/`-separated non-empty segments of `[a-zA-Z0-9._-]`,
/// none equal to `.` or `..`, without a trailing slash.
pub fn validate_path(path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(IdError::NoLeadingSlash);
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        if seg.is_empty() {
            return Err(if i == last {
                IdError::TrailingSlash
            } else {
                IdError::EmptySegment
            });
        }
        if *seg == "." || *seg == ".." {
            return Err(IdError::DotSegment);
        }
        if !seg.bytes().all(is_path_char) {
            return Err(IdError::BadPathSegmentChar);
        }
    }
    Ok(())
}

/// Validates one path segment (no slashes).
pub fn validate_path_segment(seg: &str) -> Result<(), IdError> {
    if seg.is_empty() {
        return Err(IdError::EmptySegment);
    }
    if seg == "." || seg == ".." {
        return Err(IdError::DotSegment);
    }
    if !seg.bytes().all(is_path_char) {
        return Err(IdError::BadPathSegmentChar);
    }
    Ok(())
}

/// A validated SPIFFE ID: `spiffe://<trust domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    td: TrustDomain,
    path: String,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID string (ID-01..ID-10).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        let Some(rest) = s.strip_prefix(SCHEME_PREFIX) else {
            return Err(IdError::WrongScheme);
        };
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(IdError::MissingTrustDomain);
        }
        // Any of '@', ':', '?', '#', '%' or non-ASCII lands here: userinfo, port, query,
        // fragment and percent-encoding are all invalid (ID-03, ID-04, ID-06).
        validate_trust_domain_name(td)?;
        validate_path(path)?;
        Ok(SpiffeId {
            td: TrustDomain(td.to_string()),
            path: path.to_string(),
        })
    }

    /// Builds an ID from the two fields of `spire.api.types.SPIFFEID`.
    pub fn from_parts(trust_domain: &str, path: &str) -> Result<Self, IdError> {
        let td = TrustDomain::parse(trust_domain)?;
        if trust_domain.contains(":/") {
            // A full ID in the trust_domain field is not a trust domain name.
            return Err(IdError::BadTrustDomainChar);
        }
        td.id_from_path(path)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The path, empty for the trust domain's root ID.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn is_root(&self) -> bool {
        self.path.is_empty()
    }

    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        &self.td == td
    }

    /// Refuses IDs an issuer should not produce (ID-11: longer than 2048 bytes).
    pub fn check_issuable(&self) -> Result<(), IdError> {
        if SCHEME_PREFIX.len() + self.td.0.len() + self.path.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        Ok(())
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME_PREFIX}{}{}", self.td.0, self.path)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl std::str::FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrustDomain::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_01_scheme_must_be_spiffe() {
        assert_eq!(SpiffeId::parse("http://td/p"), Err(IdError::WrongScheme));
        assert_eq!(SpiffeId::parse("spiffe:/td/p"), Err(IdError::WrongScheme));
    }

    #[test]
    fn id_02_trust_domain_required() {
        for s in ["spiffe://", "spiffe:///", "spiffe:///path"] {
            assert_eq!(SpiffeId::parse(s), Err(IdError::MissingTrustDomain), "{s}");
        }
    }

    #[test]
    fn id_03_04_06_query_fragment_userinfo_port_percent_rejected() {
        for s in [
            "spiffe://td/p?x",
            "spiffe://td/p#f",
            "spiffe://user:pw@td/p",
            "spiffe://td:8080/p",
            "spiffe://%62%61%64/p",
            "spiffe://td/%62",
        ] {
            assert!(SpiffeId::parse(s).is_err(), "{s}");
        }
    }

    #[test]
    fn id_07_ip_and_non_dns_shapes_are_valid() {
        for s in [
            "spiffe://1.2.3.4/p",
            "spiffe://example..org",
            "spiffe://-example.org",
            "spiffe://example.org.",
        ] {
            assert!(SpiffeId::parse(s).is_ok(), "{s}");
        }
        assert!(SpiffeId::parse("spiffe://[::1]/p").is_err());
    }

    #[test]
    fn id_09_10_segments() {
        assert_eq!(
            SpiffeId::parse("spiffe://td/a//b"),
            Err(IdError::EmptySegment)
        );
        assert_eq!(SpiffeId::parse("spiffe://td/./b"), Err(IdError::DotSegment));
        assert_eq!(
            SpiffeId::parse("spiffe://td/a/.."),
            Err(IdError::DotSegment)
        );
        assert_eq!(SpiffeId::parse("spiffe://td/"), Err(IdError::TrailingSlash));
        assert!(SpiffeId::parse("spiffe://td/.a/..b/...").is_ok());
    }

    #[test]
    fn id_12_upper_case_trust_domain_rejected_path_case_kept() {
        assert_eq!(
            SpiffeId::parse("spiffe://EXAMPLE.org/p"),
            Err(IdError::BadTrustDomainChar)
        );
        assert_eq!(
            SpiffeId::parse("SPIFFE://example.org/p"),
            Err(IdError::WrongScheme)
        );
        let id = SpiffeId::parse("spiffe://example.org/MyService").unwrap();
        assert_eq!(id.to_string(), "spiffe://example.org/MyService");
    }

    #[test]
    fn id_13_trust_domain_from_id_validates_path() {
        assert_eq!(
            TrustDomain::parse("spiffe://td/"),
            Err(IdError::TrailingSlash)
        );
        assert_eq!(TrustDomain::parse("spiffe://td/x").unwrap().as_str(), "td");
    }

    #[test]
    fn id_11_issuers_refuse_ids_over_2048_bytes() {
        let ok = format!("spiffe://td/{}", "a".repeat(2048 - 12));
        assert_eq!(ok.len(), 2048);
        SpiffeId::parse(&ok).unwrap().check_issuable().unwrap();
        let long = format!("{ok}b");
        let id = SpiffeId::parse(&long).unwrap();
        assert_eq!(id.check_issuable(), Err(IdError::TooLong));
    }

    #[test]
    fn from_parts_rejects_full_id_in_trust_domain_field() {
        assert!(SpiffeId::from_parts("spiffe://td", "/p").is_err());
        assert_eq!(
            SpiffeId::from_parts("td", "/p").unwrap().to_string(),
            "spiffe://td/p"
        );
        assert_eq!(
            SpiffeId::from_parts("td", "p"),
            Err(IdError::NoLeadingSlash)
        );
    }
}
