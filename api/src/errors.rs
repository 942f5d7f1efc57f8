//! Error reports for operators: an error and the chain of its causes on one line, each cause
//! once (wrappers that repeat their source's words are not repeated), and whether a TLS
//! handshake failed because a certificate or identity was refused. It only reads errors.

use std::error::Error;

/// `e` and its causes, joined with `: `, a cause left out when the text already says it (as
/// `cannot connect: transport error` already says its source's `transport error`).
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !m.is_empty() && !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

/// The TLS error somewhere in `e`'s causes, if any (rustls errors travel inside
/// `std::io::Error`, whose `source` skips them, so those are looked into).
pub fn tls_cause<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&'a (dyn Error + 'static)> = Some(e);
    while let Some(s) = cur {
        if let Some(t) = s.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        if let Some(t) = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(t);
        }
        cur = s.source();
    }
    None
}

/// Whether the peer's certificate or identity was refused in a TLS handshake (ours refusing
/// theirs, or theirs refusing ours): a configuration mismatch that retrying does not fix. A
/// certificate refused only for its validity period (clocks apart) does not count.
pub fn certificate_refused(e: &(dyn Error + 'static)) -> bool {
    let Some(t) = tls_cause(e) else {
        return false;
    };
    if let rustls::Error::General(m) = t
        && (m.contains("has expired") || m.contains("is not valid yet"))
    {
        return false;
    }
    matches!(
        t,
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer
                | rustls::CertificateError::BadSignature
                | rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. }
                | rustls::CertificateError::InvalidPurpose
                | rustls::CertificateError::ApplicationVerificationFailure
        ) | rustls::Error::General(_)
            | rustls::Error::AlertReceived(
                rustls::AlertDescription::BadCertificate
                    | rustls::AlertDescription::UnknownCA
                    | rustls::AlertDescription::CertificateUnknown
                    | rustls::AlertDescription::AccessDenied
            )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot connect to the server at {addr}: {source}")]
        Connect {
            addr: String,
            #[source]
            source: Middle,
        },
    }

    #[derive(Debug, thiserror::Error)]
    #[error("transport error")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn errors_chain_names_the_cause_once() {
        let io = std::io::Error::other(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        let e = Outer::Connect {
            addr: "127.0.0.1:8081".into(),
            source: Middle(io),
        };
        let s = chain(&e);
        assert_eq!(s.matches("transport error").count(), 1, "{s}");
        assert!(s.contains("UnknownIssuer"), "{s}");
        assert!(certificate_refused(&e));
        let expired = Outer::Connect {
            addr: "x".into(),
            source: Middle(std::io::Error::other(rustls::Error::General(
                "peer X509-SVID rejected: certificate 0 of the chain has expired".into(),
            ))),
        };
        assert!(!certificate_refused(&expired), "a clock apart is retried");
        let refused = Outer::Connect {
            addr: "x".into(),
            source: Middle(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        };
        assert!(!certificate_refused(&refused));
        assert!(chain(&refused).contains("refused"), "{}", chain(&refused));
    }
}
