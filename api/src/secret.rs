//! [`Secret`]: a PIN, token, password or key material from a configuration or a command line.
//! It is zeroed when dropped, prints as `***` in `Debug`, and compares in constant time. It
//! does not read or store anything itself; whoever needs the value asks for it explicitly
//! with [`Secret::expose`].

use zeroize::Zeroize;

/// A secret string: never printed, zeroed on drop, compared in constant time.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one call that needs it (a login, a TPM authorization).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(v: String) -> Self {
        Secret(v)
    }
}

impl From<&str> for Secret {
    fn from(v: &str) -> Self {
        Secret(v.to_string())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // An empty secret says so: "no password" is not itself secret, and it helps an
        // operator see that a value was not set.
        f.write_str(if self.0.is_empty() { "\"\"" } else { "***" })
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for Secret {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_never_printed_and_compares_by_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "***");
        assert!(!format!("{:?}", Some(&s)).contains("hunter2"));
        assert_eq!(format!("{:?}", Secret::default()), "\"\"");
        assert_eq!(s, Secret::from("hunter2"));
        assert_ne!(s, Secret::from("hunter3"));
        assert_ne!(s, Secret::from("hunter22"));
        assert_eq!(s.expose(), "hunter2");
    }
}
