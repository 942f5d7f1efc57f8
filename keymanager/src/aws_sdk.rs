//! The AWS SDK configuration Kame's AWS clients share (the aws_kms KeyManager and the aws_pca
//! UpstreamAuthority): the region, static credentials or the default credential chain, an
//! optional endpoint (a compatible service), and each call's deadline. It makes no call and
//! never logs the secret key.

use std::time::Duration;

/// What an AWS client is configured from.
#[derive(Debug, Clone, Copy)]
pub struct AwsSettings<'a> {
    pub region: &'a str,
    /// Access key ID and secret access key; none: the default AWS credential chain.
    pub static_credentials: Option<(&'a str, &'a str)>,
    pub endpoint: Option<&'a str>,
    /// Each operation's deadline (connecting: at most 5 s of it).
    pub call_timeout: Duration,
}

/// The SDK configuration for `s`.
pub async fn sdk_config(s: &AwsSettings<'_>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(s.region.to_string()))
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_timeout(s.call_timeout)
                .connect_timeout(s.call_timeout.min(Duration::from_secs(5)))
                .build(),
        );
    if let Some((id, secret)) = s.static_credentials {
        loader = loader.credentials_provider(aws_credential_types::Credentials::new(
            id,
            secret,
            None,
            None,
            "kame-config",
        ));
    }
    if let Some(e) = s.endpoint {
        loader = loader.endpoint_url(e);
    }
    loader.load().await
}
