//! A real AWS SDK client (the `aws-config` crate's IMDS client and credentials provider)
//! fetching instance metadata and role credentials through the proxy from the simulator.

mod support;

use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_config::provider_config::ProviderConfig;
use aws_credential_types::provider::ProvideCredentials;
use support::{proxy, simulator};

fn provider_config() -> ProviderConfig {
    // The SDK's plain-HTTP client: IMDS is http:// only, so no TLS stack is built.
    ProviderConfig::without_region()
        .with_http_client(aws_smithy_http_client::Builder::new().build_http())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_aws_sdk_gets_metadata_and_credentials_through_the_proxy() {
    let sim = simulator(&["--tokens", "required"]);
    let proxy = proxy(&sim.url(), &[]);
    let config = provider_config();
    let imds = aws_config::imds::Client::builder()
        .configure(&config)
        .endpoint(proxy.url())
        .expect("the proxy URL is a valid endpoint")
        .build();

    // The SDK PUTs for a token first (tokens are required) and refuses a token answer without
    // the TTL header, so this proves the token round trip as well.
    let instance_id = imds
        .get("/latest/meta-data/instance-id")
        .await
        .expect("instance-id through the proxy");
    assert!(instance_id.as_ref().starts_with("i-0"), "{instance_id:?}");

    let credentials = ImdsCredentialsProvider::builder()
        .configure(&config)
        .imds_client(imds)
        .build()
        .provide_credentials()
        .await
        .expect("credentials through the proxy");
    assert!(credentials.access_key_id().starts_with("ASIA"));
    assert_eq!(credentials.secret_access_key().len(), 40);
    assert!(credentials.session_token().is_some_and(|t| !t.is_empty()));
    let expiry = credentials.expiry().expect("IMDS credentials expire");
    assert!(expiry > std::time::SystemTime::now());
}
