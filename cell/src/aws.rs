//! Where a cell's AWS backends (the SQS queue, the SES mailer) live and as whom they call.
//!
//! Each cell loads its own configuration, so two cells can send from two accounts or two
//! regions: one cell's throttled account, suspended sending or regional outage stays that
//! cell's. Without flags the SDK's normal chain decides (`AWS_REGION`, `AWS_PROFILE`,
//! `AWS_ENDPOINT_URL` and the per-service `AWS_ENDPOINT_URL_SQS` / `AWS_ENDPOINT_URL_SESV2`,
//! the credentials chain); a flag overrides its part of that chain for this cell only.

use aws_config::{BehaviorVersion, Region, SdkConfig};

/// Per-cell overrides of the AWS SDK's configuration chain.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AwsSettings {
    /// AWS region of this cell's queue and mailer (default: the SDK's chain, e.g. AWS_REGION).
    #[arg(long = "aws-region", env = "CELLMAIL_AWS_REGION")]
    pub region: Option<String>,
    /// Endpoint for every AWS call of this cell, e.g. an emulator's http://127.0.0.1:PORT.
    #[arg(long = "aws-endpoint", env = "CELLMAIL_AWS_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Shared-config profile whose credentials and settings this cell uses.
    #[arg(long = "aws-profile", env = "CELLMAIL_AWS_PROFILE")]
    pub profile: Option<String>,
}

impl AwsSettings {
    /// The SDK's configuration chain with this cell's overrides applied.
    pub async fn sdk_config(&self) -> SdkConfig {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &self.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(endpoint) = &self.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(profile) = &self.profile {
            loader = loader.profile_name(profile);
        }
        loader.load().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overrides_replace_their_part_of_the_chain() {
        let settings = AwsSettings {
            region: Some("eu-west-3".into()),
            endpoint: Some("http://127.0.0.1:4566".into()),
            profile: None,
        };
        let config = settings.sdk_config().await;
        assert_eq!(config.region().map(Region::as_ref), Some("eu-west-3"));
        assert_eq!(config.endpoint_url(), Some("http://127.0.0.1:4566"));
    }
}
